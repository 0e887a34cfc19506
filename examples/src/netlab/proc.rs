//! Small process and file helpers shared by the lab and its helper
//! processes: wall-clock timestamps, a parent watchdog, signals, JSON-lines
//! files written by one process and tailed by another.

use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Microseconds since the Unix epoch: every record of the lab carries this,
/// so that files written by processes in different namespaces line up.
pub fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// Exit when the process that started us is gone (it was killed before it
/// could tear the lab down): nothing of the lab outlives it by more than
/// 200 ms. The lab starts helpers with `ip netns exec`, which execs, so
/// our parent is the lab process itself.
pub fn exit_with_parent() {
    let parent = std::os::unix::process::parent_id();
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(200));
        if std::os::unix::process::parent_id() != parent {
            std::process::exit(1);
        }
    });
}

/// Send `sig` (`STOP`, `CONT`, `KILL`) to `pid`, with the shell's builtin
/// `kill` (always there; the `kill` binary is in procps, which slim images lack).
pub fn signal(pid: u32, sig: &str) {
    let _ = std::process::Command::new("sh")
        .args(["-c", "kill -s \"$1\" \"$2\" 2>/dev/null", "sh", sig, &pid.to_string()])
        .status();
}

/// Appends JSON lines from any thread; a dedicated thread writes them and
/// flushes whenever it has nothing more queued, so that a reader in another
/// process sees each line within a millisecond or so.
#[derive(Clone)]
pub struct JsonLines {
    tx: std::sync::mpsc::Sender<Record>,
}

enum Record {
    Line(String),
    /// Answered once every line sent before it is flushed.
    Flush(std::sync::mpsc::Sender<()>),
}

impl JsonLines {
    pub fn create(path: &Path) -> anyhow::Result<JsonLines> {
        let file = std::fs::File::create(path)?;
        let (tx, rx) = std::sync::mpsc::channel::<Record>();
        std::thread::spawn(move || {
            let mut w = BufWriter::new(file);
            let mut waiting = Vec::new();
            while let Ok(first) = rx.recv() {
                let mut next = Some(first);
                while let Some(record) = next {
                    match record {
                        Record::Line(line) => {
                            let _ = writeln!(w, "{line}");
                        }
                        Record::Flush(ack) => waiting.push(ack),
                    }
                    next = rx.try_recv().ok();
                }
                let _ = w.flush();
                for ack in waiting.drain(..) {
                    let _ = ack.send(());
                }
            }
        });
        Ok(JsonLines { tx })
    }

    pub fn write(&self, value: &serde_json::Value) {
        let _ = self.tx.send(Record::Line(value.to_string()));
    }

    /// Wait until everything written so far is in the file.
    pub fn flush(&self) {
        let (ack, done) = std::sync::mpsc::channel();
        if self.tx.send(Record::Flush(ack)).is_ok() {
            let _ = done.recv_timeout(Duration::from_secs(5));
        }
    }
}

/// Reads the complete lines appended to a file since the last call.
pub struct LineTail {
    path: PathBuf,
    offset: u64,
    partial: String,
}

impl LineTail {
    pub fn new(path: impl Into<PathBuf>) -> LineTail {
        LineTail { path: path.into(), offset: 0, partial: String::new() }
    }

    /// New complete, non-empty lines (a missing file has none yet).
    pub fn read(&mut self) -> Vec<String> {
        let Ok(mut f) = std::fs::File::open(&self.path) else { return Vec::new() };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return Vec::new();
        }
        let mut buf = String::new();
        let Ok(n) = f.read_to_string(&mut buf) else { return Vec::new() };
        self.offset += n as u64;
        self.partial.push_str(&buf);
        let Some(end) = self.partial.rfind('\n') else { return Vec::new() };
        let complete: String = self.partial.drain(..=end).collect();
        complete.lines().filter(|l| !l.trim().is_empty()).map(str::to_string).collect()
    }
}

/// Every complete JSON line of a file (for the checker, after the fact).
pub fn read_json_lines(path: &Path) -> Vec<serde_json::Value> {
    LineTail::new(path).read().iter().filter_map(|l| serde_json::from_str(l).ok()).collect()
}
