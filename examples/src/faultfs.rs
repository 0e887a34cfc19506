//! faultfs: a FUSE passthrough of one directory that injects disk faults on
//! command, for tests that need a broker's data directory to fail the way a
//! real disk does (no device-mapper or netem needed, only `/dev/fuse` and
//! root).
//!
//! [`mount`] serves `backing` at `mountpoint` and returns a [`FaultMount`]
//! whose `Drop` unmounts; [`serve`] is the same for a process that runs until
//! unmounted or sent SIGTERM/SIGINT/SIGHUP (the `faultfs mount` command).
//! The fault is switched at run time with [`FaultMount::set`] or, from
//! another process, through the control socket with [`control`]
//! (`faultfs ctl SOCKET COMMAND`). A new fault applies to every operation
//! that starts after the switch returned; operations already running (a
//! stalled fsync, say) finish under the fault they started with.
//!
//! | command        | effect                                                                                  |
//! |----------------|-----------------------------------------------------------------------------------------|
//! | `ok`           | plain passthrough                                                                       |
//! | `eio`          | write, fsync/fdatasync/fsyncdir, create/mkdir/mknod/symlink/link, truncate, fallocate and `open(O_TRUNC)` fail with EIO; reads, stat, readdir, unlink, rename, chmod still work |
//! | `enospc`       | write, create/mkdir/mknod/symlink/link, growing truncate and fallocate fail with ENOSPC; statfs reports no free space |
//! | `readonly`     | EROFS on everything that modifies, including fsync and opening for write               |
//! | `stall MS`     | every fsync/fdatasync/fsyncdir sleeps MS milliseconds, then runs; `stall MS writes` also delays writes |
//! | `full BYTES`   | ENOSPC for a write, truncate or fallocate that would take the backing files' total size over BYTES (k/m/g suffixes, binary) |
//! | `status`       | prints `mode=… ops=… reads=… writes=… fsyncs=… injected=… stalled=…`                    |
//!
//! Faults are injected before the real operation, so a failed write has not
//! changed the backing file. A stalled operation sleeps on a thread of its
//! own: other requests, including others on the same file, keep being
//! served (the kernel itself holds the file's inode lock during a FUSE
//! fsync, so writes to *that* file wait for the stalled fsync, as they may
//! on a slow disk).
//!
//! Inodes are held as `O_PATH` descriptors (as libfuse's `passthrough_ll`
//! does), so renames, unlinked-but-open files and hard links behave as on
//! the backing filesystem; inode numbers seen through the mount are the
//! backing ones (the root's is swapped with 1, FUSE's root id). The backing
//! directory must be one filesystem (a mount inside it answers EXDEV) and
//! must not be changed behind the mount's back while it is mounted (the
//! kernel caches attributes for `attr_ttl`). Extended attributes, locks
//! over FUSE (flock/fcntl locks are local to this kernel, which is all sled
//! needs), `O_DIRECT` and kernel passthrough are not provided.
//!
//! What this means for sled 0.34: its `flush()` writes with pwrite and
//! ends in `sync_file_range`, which FUSE does not forward (without a
//! writeback cache every write already reached faultfs). So through
//! faultfs sled's flush fails under `eio`/`enospc`/`readonly`/`full` (its
//! write does) but neither waits for the disk nor for `stall MS` (only
//! `stall MS writes`); the fsyncs that `stall` delays are sled's 500 ms
//! background flusher's (whose errors sled only logs) and the fdatasync
//! that twinmq's `Store::sync` makes after the flush. A sled `Db` that hit
//! an I/O error keeps returning it after `ok`; reopening recovers.
//!
//! One FUSE worker thread serves requests (more made each round trip
//! slower on a 2-core VM); real fsyncs run on a small pool and stalls on
//! threads of their own, so neither holds the worker up. Each request
//! costs ~10–25 µs more than the native call, a handed-off fsync ~40 µs
//! more (measured: `passthrough_overhead` in the tests).
//!
//! The mount is made by `mount(2)` directly (fuser's pure-Rust mount), so
//! root is needed and neither libfuse nor `fusermount3` is.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{DirEntryExt, FileExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use nix::errno::Errno as NixErrno;
use nix::fcntl::{AtFlags, FallocateFlags, OFlag, AT_FDCWD};
use nix::libc;
use nix::sys::stat::{FileStat, Mode, SFlag};
use nix::sys::time::TimeSpec;

/// FUSE's node id for the root directory.
const ROOT_ID: u64 = 1;

/// No FLUSH on close: faultfs has nothing to do then, and a close that
/// waits for an answer deadlocks a process that is both this server and a
/// client of it if it exits with a file still open (its exit closes that
/// file after the server threads are gone). RELEASE is asynchronous.
const OPEN_FLAGS: FopenFlags = FopenFlags::FOPEN_NOFLUSH;

/// Threads running the real fsyncs (see [`SyncPool`]).
const SYNC_THREADS: usize = 4;

// ---------------------------------------------------------------------------
// Faults and their status
// ---------------------------------------------------------------------------

/// The fault in force. Parsed from and printed as the control command that
/// selects it (`"stall 500"`, `"full 1048576"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Plain passthrough.
    Ok,
    /// Writes, syncs and creates fail with EIO; reads work.
    Eio,
    /// Writes and creates fail with ENOSPC.
    Enospc,
    /// Everything that modifies fails with EROFS.
    ReadOnly,
    /// Syncs (and, with `writes`, writes) sleep `ms` before running.
    Stall { ms: u64, writes: bool },
    /// ENOSPC once the backing files' total apparent size would exceed `bytes`.
    Full { bytes: u64 },
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Ok => f.write_str("ok"),
            Fault::Eio => f.write_str("eio"),
            Fault::Enospc => f.write_str("enospc"),
            Fault::ReadOnly => f.write_str("readonly"),
            Fault::Stall { ms, writes: false } => write!(f, "stall {ms}"),
            Fault::Stall { ms, writes: true } => write!(f, "stall {ms} writes"),
            Fault::Full { bytes } => write!(f, "full {bytes}"),
        }
    }
}

impl FromStr for Fault {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Fault> {
        let words: Vec<&str> = s.split_whitespace().collect();
        Ok(match words.as_slice() {
            ["ok"] => Fault::Ok,
            ["eio"] => Fault::Eio,
            ["enospc"] => Fault::Enospc,
            ["readonly"] => Fault::ReadOnly,
            ["stall", ms] => Fault::Stall { ms: parse_u64(ms, "stall MS")?, writes: false },
            ["stall", ms, "writes"] => Fault::Stall { ms: parse_u64(ms, "stall MS")?, writes: true },
            ["full", bytes] => Fault::Full { bytes: parse_size(bytes)? },
            _ => bail!(
                "unknown fault {s:?}: expected ok | eio | enospc | readonly | stall MS [writes] | full BYTES | status"
            ),
        })
    }
}

fn parse_u64(s: &str, what: &str) -> anyhow::Result<u64> {
    s.parse().with_context(|| format!("{what}: {s:?} is not a non-negative integer"))
}

/// `1048576`, `64k`, `10M`, `1g` (binary multiples).
fn parse_size(s: &str) -> anyhow::Result<u64> {
    let (digits, mult) = match s.char_indices().last() {
        Some((i, 'k' | 'K')) => (&s[..i], 1u64 << 10),
        Some((i, 'm' | 'M')) => (&s[..i], 1 << 20),
        Some((i, 'g' | 'G')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    parse_u64(digits, "full BYTES")?.checked_mul(mult).with_context(|| format!("full BYTES: {s:?} is too large"))
}

/// What the mount has done since it was mounted, and the fault in force.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status {
    pub fault: Fault,
    /// Every FUSE request served.
    pub ops: u64,
    pub reads: u64,
    pub writes: u64,
    /// fsync, fdatasync and fsyncdir requests.
    pub fsyncs: u64,
    /// Requests answered with an injected error.
    pub injected: u64,
    /// Requests delayed by `stall`.
    pub stalled: u64,
    /// Under `full`: the backing files' total apparent size as accounted.
    pub used: Option<u64>,
}

impl fmt::Display for Status {
    /// One line of `key=value` words, the mode and its parameters first.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.fault {
            Fault::Ok => f.write_str("mode=ok")?,
            Fault::Eio => f.write_str("mode=eio")?,
            Fault::Enospc => f.write_str("mode=enospc")?,
            Fault::ReadOnly => f.write_str("mode=readonly")?,
            Fault::Stall { ms, writes } => {
                write!(f, "mode=stall ms={ms} stall_writes={}", if writes { "yes" } else { "no" })?
            }
            Fault::Full { bytes } => write!(f, "mode=full limit={bytes} used={}", self.used.unwrap_or(0))?,
        }
        write!(
            f,
            " ops={} reads={} writes={} fsyncs={} injected={} stalled={}",
            self.ops, self.reads, self.writes, self.fsyncs, self.injected, self.stalled
        )
    }
}

/// The fault in force and the counters, shared by the FUSE handlers, the
/// control socket and the [`FaultMount`] handle.
struct State {
    backing: PathBuf,
    fault: RwLock<Fault>,
    /// Under `full`, the accounted size of the backing files. Its lock also
    /// serialises the size-changing operations while `full` is in force, so
    /// that check-then-write cannot race past the limit.
    used: Mutex<u64>,
    ops: AtomicU64,
    reads: AtomicU64,
    writes: AtomicU64,
    fsyncs: AtomicU64,
    injected: AtomicU64,
    stalled: AtomicU64,
}

impl State {
    fn fault(&self) -> Fault {
        *self.fault.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn set(&self, fault: Fault) -> io::Result<()> {
        // Take `used` first, as the handlers do, so no size-changing
        // operation is between its check and its accounting meanwhile.
        let mut used = lock(&self.used);
        if let Fault::Full { .. } = fault {
            *used = tree_size(&self.backing)?;
        }
        *self.fault.write().unwrap_or_else(PoisonError::into_inner) = fault;
        Ok(())
    }

    fn status(&self) -> Status {
        let fault = self.fault();
        let used = matches!(fault, Fault::Full { .. }).then(|| *lock(&self.used));
        Status {
            fault,
            ops: self.ops.load(Ordering::Relaxed),
            reads: self.reads.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
            fsyncs: self.fsyncs.load(Ordering::Relaxed),
            injected: self.injected.load(Ordering::Relaxed),
            stalled: self.stalled.load(Ordering::Relaxed),
            used,
        }
    }

    /// The outcome of a control command, as sent back on the socket.
    fn command(&self, line: &str) -> String {
        let line = line.trim();
        if line == "status" {
            return self.status().to_string();
        }
        match line.parse::<Fault>() {
            Ok(fault) => match self.set(fault) {
                Ok(()) => {
                    tracing::info!(%fault, "fault switched");
                    self.status().to_string()
                }
                Err(e) => format!("error: {fault}: {e}"),
            },
            Err(e) => format!("error: {e}"),
        }
    }
}

/// Sum of the apparent sizes of the regular files under `dir`, hard links
/// counted once.
fn tree_size(dir: &Path) -> io::Result<u64> {
    let mut seen = std::collections::HashSet::new();
    let mut total = 0u64;
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                todo.push(entry.path());
            } else if meta.is_file() && seen.insert(meta.ino()) {
                total += meta.len();
            }
        }
    }
    Ok(total)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------------------
// The filesystem
// ---------------------------------------------------------------------------

/// What an operation is, for deciding which faults hit it.
#[derive(Clone, Copy)]
enum Kind {
    Write,
    Sync,
    /// create, mkdir, mknod, symlink, link
    Create,
    /// truncate (setattr size, open with O_TRUNC) and fallocate
    Resize {
        grows: bool,
    },
    /// unlink, rmdir, rename, chmod, chown, utimes
    Modify,
}

/// What a handler must do after the fault check passed.
enum Gate {
    Go,
    Stall(Duration),
    /// `full` is in force: account the size change against this limit.
    Full(u64),
}

type Job = Box<dyn FnOnce() + Send>;

/// Threads that run the real fsyncs, so that a slow disk flush does not hold
/// up the FUSE worker serving everything else (one worker by default: on a
/// 2-core VM, each extra worker thread roughly doubled the cost of a FUSE
/// round trip, from ~10 µs to 20–80 µs, through cross-CPU wake-ups).
struct SyncPool {
    jobs: mpsc::Sender<Job>,
}

impl SyncPool {
    fn new(threads: usize) -> io::Result<SyncPool> {
        let (jobs, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let rx = rx.clone();
            thread::Builder::new().name(format!("faultfs-sync-{i}")).spawn(move || loop {
                // Ends when the filesystem, and so the sender, is dropped.
                let Ok(job) = lock(&rx).recv() else { break };
                job();
            })?;
        }
        Ok(SyncPool { jobs })
    }

    fn run(&self, job: Job) {
        if let Err(mpsc::SendError(job)) = self.jobs.send(job) {
            job();
        }
    }
}

struct Node {
    /// `O_PATH` descriptor of the backing inode.
    fd: Arc<OwnedFd>,
    /// The kernel's lookup count; the node is dropped when it reaches 0.
    lookups: u64,
}

struct DirHandle {
    file: File,
    /// Snapshot taken at opendir; readdir offsets index into it.
    entries: Vec<(OsString, u64, FileType)>,
}

/// The changes of one setattr request that faultfs applies.
struct SetAttr {
    mode: Option<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
    size: Option<u64>,
    atime: Option<TimeOrNow>,
    mtime: Option<TimeOrNow>,
    fh: Option<FileHandle>,
}

struct FaultFs {
    state: Arc<State>,
    /// Backing root's inode number, swapped with [`ROOT_ID`] in node ids.
    root_ino: u64,
    root_dev: u64,
    root_fd: Arc<OwnedFd>,
    ttl: Duration,
    nodes: Mutex<HashMap<u64, Node>>,
    files: Mutex<HashMap<u64, Arc<File>>>,
    dirs: Mutex<HashMap<u64, Arc<DirHandle>>>,
    next_fh: AtomicU64,
    syncs: SyncPool,
}

type R<T> = Result<T, Errno>;

fn nix_err(e: NixErrno) -> Errno {
    Errno::from_i32(e as i32)
}

fn io_err(e: io::Error) -> Errno {
    Errno::from(e)
}

/// The path through which a descriptor (even an `O_PATH` one) can be
/// reopened or used by path-only calls.
fn proc_path(fd: &impl AsRawFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

fn system_time(secs: i64, nsecs: i64) -> SystemTime {
    let nanos = u32::try_from(nsecs).unwrap_or(0);
    match u64::try_from(secs) {
        Ok(s) => UNIX_EPOCH + Duration::new(s, nanos),
        Err(_) => UNIX_EPOCH - Duration::new(secs.unsigned_abs(), 0) + Duration::new(0, nanos),
    }
}

fn file_type(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

fn attr(st: &FileStat, id: u64) -> FileAttr {
    FileAttr {
        ino: INodeNo(id),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: system_time(st.st_atime, st.st_atime_nsec),
        mtime: system_time(st.st_mtime, st.st_mtime_nsec),
        ctime: system_time(st.st_ctime, st.st_ctime_nsec),
        crtime: UNIX_EPOCH,
        kind: file_type(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

fn time_spec(t: Option<TimeOrNow>) -> TimeSpec {
    match t {
        None => TimeSpec::UTIME_OMIT,
        Some(TimeOrNow::Now) => TimeSpec::UTIME_NOW,
        Some(TimeOrNow::SpecificTime(t)) => TimeSpec::from(t.duration_since(UNIX_EPOCH).unwrap_or_default()),
    }
}

/// Flags the kernel passes to open/create that must not reach the reopen
/// of `/proc/self/fd/N` (or that we do not provide).
fn open_flags(flags: i32) -> OFlag {
    let drop = OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOCTTY | OFlag::O_NOFOLLOW | OFlag::O_DIRECT;
    (OFlag::from_bits_truncate(flags) - drop) | OFlag::O_CLOEXEC
}

fn read_full(file: &File, offset: u64, size: u32) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; size as usize];
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], offset + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(n);
    Ok(buf)
}

fn write_full(file: &File, offset: u64, data: &[u8]) -> R<u32> {
    file.write_all_at(data, offset).map_err(io_err)?;
    Ok(data.len() as u32)
}

impl FaultFs {
    fn new(backing: &Path, state: Arc<State>, ttl: Duration) -> io::Result<FaultFs> {
        let root = nix::fcntl::open(backing, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())?;
        let st = nix::sys::stat::fstat(&root)?;
        let root_fd = Arc::new(root);
        let mut nodes = HashMap::new();
        nodes.insert(ROOT_ID, Node { fd: root_fd.clone(), lookups: 1 });
        Ok(FaultFs {
            state,
            root_ino: st.st_ino,
            root_dev: st.st_dev,
            root_fd,
            ttl,
            nodes: Mutex::new(nodes),
            files: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            syncs: SyncPool::new(SYNC_THREADS)?,
        })
    }

    /// Backing inode number <-> FUSE node id: the identity but for the
    /// root's number and 1 (FUSE's root id), which trade places.
    fn swap_root(&self, n: u64) -> u64 {
        if n == self.root_ino {
            ROOT_ID
        } else if n == ROOT_ID {
            self.root_ino
        } else {
            n
        }
    }

    fn op(&self) {
        self.state.ops.fetch_add(1, Ordering::Relaxed);
    }

    fn inject(&self, e: Errno) -> Errno {
        self.state.injected.fetch_add(1, Ordering::Relaxed);
        e
    }

    /// Decides, from the fault in force when the operation starts, whether
    /// it fails, waits, or must be accounted against `full`.
    fn gate(&self, kind: Kind) -> R<Gate> {
        let fault = self.state.fault();
        let fail = match (fault, kind) {
            (Fault::Ok, _) => None,
            (Fault::ReadOnly, _) => Some(Errno::EROFS),
            (Fault::Eio, Kind::Modify) => None,
            (Fault::Eio, _) => Some(Errno::EIO),
            (Fault::Enospc, Kind::Write | Kind::Create | Kind::Resize { grows: true }) => Some(Errno::ENOSPC),
            (Fault::Enospc, _) => None,
            (Fault::Stall { ms, .. }, Kind::Sync) | (Fault::Stall { ms, writes: true }, Kind::Write) => {
                return Ok(Gate::Stall(Duration::from_millis(ms)));
            }
            (Fault::Stall { .. }, _) => None,
            (Fault::Full { bytes }, Kind::Write | Kind::Resize { .. } | Kind::Modify) => return Ok(Gate::Full(bytes)),
            (Fault::Full { .. }, _) => None,
        };
        match fail {
            Some(e) => Err(self.inject(e)),
            None => Ok(Gate::Go),
        }
    }

    /// Runs `f` after `delay` on a thread of its own, so that the FUSE
    /// worker goes on serving other requests meanwhile.
    fn stall(&self, delay: Duration, f: impl FnOnce() + Send + 'static) {
        self.state.stalled.fetch_add(1, Ordering::Relaxed);
        let job = Arc::new(Mutex::new(Some(f)));
        let job2 = job.clone();
        let spawned = thread::Builder::new().name("faultfs-stall".into()).spawn(move || {
            thread::sleep(delay);
            if let Some(f) = lock(&job2).take() {
                f();
            }
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot spawn a stall thread; stalling a FUSE worker instead");
            thread::sleep(delay);
            if let Some(f) = lock(&job).take() {
                f();
            }
        }
    }

    fn node(&self, id: INodeNo) -> R<Arc<OwnedFd>> {
        lock(&self.nodes).get(&id.0).map(|n| n.fd.clone()).ok_or(Errno::ESTALE)
    }

    fn file(&self, fh: FileHandle) -> R<Arc<File>> {
        lock(&self.files).get(&fh.0).cloned().ok_or(Errno::EBADF)
    }

    fn dir(&self, fh: FileHandle) -> R<Arc<DirHandle>> {
        lock(&self.dirs).get(&fh.0).cloned().ok_or(Errno::EBADF)
    }

    fn new_fh(&self) -> u64 {
        self.next_fh.fetch_add(1, Ordering::Relaxed)
    }

    /// Counts one kernel lookup of the inode behind `fd` and returns its
    /// attributes.
    fn remember(&self, fd: OwnedFd) -> R<FileAttr> {
        let st = nix::sys::stat::fstat(&fd).map_err(nix_err)?;
        if st.st_dev != self.root_dev {
            // Another filesystem mounted inside the backing directory:
            // its inode numbers could collide with ours.
            return Err(Errno::EXDEV);
        }
        let id = self.swap_root(st.st_ino);
        lock(&self.nodes).entry(id).and_modify(|n| n.lookups += 1).or_insert(Node { fd: Arc::new(fd), lookups: 1 });
        Ok(attr(&st, id))
    }

    fn lookup_at(&self, parent: &OwnedFd, name: &OsStr) -> R<FileAttr> {
        let fd = nix::fcntl::openat(parent, name, OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty())
            .map_err(nix_err)?;
        self.remember(fd)
    }

    /// Gives a newly made inode to the caller, as the kernel would have.
    fn chown_to_caller(&self, req: &Request, fd: &impl AsFd) {
        if req.uid() != nix::unistd::geteuid().as_raw() {
            let r = nix::unistd::fchownat(
                fd,
                "",
                Some(nix::unistd::Uid::from_raw(req.uid())),
                Some(nix::unistd::Gid::from_raw(req.gid())),
                AtFlags::AT_EMPTY_PATH | AtFlags::AT_SYMLINK_NOFOLLOW,
            );
            if let Err(e) = r {
                tracing::debug!(error = %e, "chown of a new inode to its creator failed");
            }
        }
    }

    /// Size of the regular file `name` in `parent` that removing it frees
    /// (0 when other links keep it).
    fn freed_by_removal(parent: &OwnedFd, name: &OsStr) -> u64 {
        match nix::sys::stat::fstatat(parent, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFREG && st.st_nlink == 1 => st.st_size as u64,
            _ => 0,
        }
    }

    fn do_setattr(&self, ino: INodeNo, change: SetAttr) -> R<FileAttr> {
        let SetAttr { mode, uid, gid, size, atime, mtime, fh } = change;
        let node = self.node(ino)?;
        if let Some(size) = size {
            let cur = nix::sys::stat::fstat(&*node).map_err(nix_err)?.st_size as u64;
            let gate = self.gate(Kind::Resize { grows: size > cur })?;
            let mut used = None;
            if let Gate::Full(limit) = gate {
                let u = lock(&self.state.used);
                if size > cur && *u + (size - cur) > limit {
                    return Err(self.inject(Errno::ENOSPC));
                }
                used = Some(u);
            }
            match fh.map(|fh| self.file(fh)) {
                Some(Ok(f)) => f.set_len(size),
                _ => OpenOptions::new().write(true).open(proc_path(&*node)).and_then(|f| f.set_len(size)),
            }
            .map_err(io_err)?;
            if let Some(mut u) = used {
                *u = (*u + size).saturating_sub(cur);
            }
        }
        if mode.is_some() || uid.is_some() || gid.is_some() || atime.is_some() || mtime.is_some() {
            self.gate(Kind::Modify)?;
        }
        if let Some(mode) = mode {
            nix::sys::stat::fchmodat(
                AT_FDCWD,
                &proc_path(&*node),
                Mode::from_bits_truncate(mode & 0o7777),
                nix::sys::stat::FchmodatFlags::FollowSymlink,
            )
            .map_err(nix_err)?;
        }
        if uid.is_some() || gid.is_some() {
            nix::unistd::fchownat(
                &*node,
                "",
                uid.map(nix::unistd::Uid::from_raw),
                gid.map(nix::unistd::Gid::from_raw),
                AtFlags::AT_EMPTY_PATH | AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(nix_err)?;
        }
        if atime.is_some() || mtime.is_some() {
            nix::sys::stat::utimensat(
                AT_FDCWD,
                &proc_path(&*node),
                &time_spec(atime),
                &time_spec(mtime),
                nix::sys::stat::UtimensatFlags::FollowSymlink,
            )
            .map_err(nix_err)?;
        }
        let st = nix::sys::stat::fstat(&*node).map_err(nix_err)?;
        Ok(attr(&st, ino.0))
    }

    fn do_open(&self, ino: INodeNo, flags: i32) -> R<u64> {
        let node = self.node(ino)?;
        let oflags = open_flags(flags);
        let writes = flags & libc::O_ACCMODE != libc::O_RDONLY;
        let truncates = oflags.contains(OFlag::O_TRUNC);
        if writes && !truncates && self.state.fault() == Fault::ReadOnly {
            return Err(self.inject(Errno::EROFS));
        }
        let mut used = None;
        let mut cur = 0;
        if truncates {
            if let Gate::Full(_) = self.gate(Kind::Resize { grows: false })? {
                cur = nix::sys::stat::fstat(&*node).map_err(nix_err)?.st_size as u64;
                used = Some(lock(&self.state.used));
            }
        }
        let fd = nix::fcntl::open(&proc_path(&*node), oflags, Mode::empty()).map_err(nix_err)?;
        if let Some(mut u) = used {
            *u = u.saturating_sub(cur);
        }
        let fh = self.new_fh();
        lock(&self.files).insert(fh, Arc::new(File::from(fd)));
        Ok(fh)
    }

    fn do_create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
    ) -> R<(FileAttr, u64)> {
        self.gate(Kind::Create)?;
        let dir = self.node(parent)?;
        let perm = Mode::from_bits_truncate(mode & !umask & 0o7777);
        let fd = nix::fcntl::openat(&*dir, name, open_flags(flags) | OFlag::O_CREAT, perm).map_err(nix_err)?;
        self.chown_to_caller(req, &fd);
        let path_fd =
            nix::fcntl::open(&proc_path(&fd), OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty()).map_err(nix_err)?;
        let attr = self.remember(path_fd)?;
        let fh = self.new_fh();
        lock(&self.files).insert(fh, Arc::new(File::from(fd)));
        Ok((attr, fh))
    }

    fn do_write(&self, fh: FileHandle, offset: u64, data: &[u8], reply: ReplyWrite) {
        let file = match self.file(fh) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        match self.gate(Kind::Write) {
            Err(e) => reply.error(e),
            Ok(Gate::Go) => reply_written(reply, write_full(&file, offset, data)),
            Ok(Gate::Stall(delay)) => {
                let data = data.to_vec();
                self.stall(delay, move || reply_written(reply, write_full(&file, offset, &data)));
            }
            Ok(Gate::Full(limit)) => {
                let mut used = lock(&self.state.used);
                let size = match file.metadata() {
                    Ok(m) => m.len(),
                    Err(e) => return reply.error(io_err(e)),
                };
                let grows = (offset + data.len() as u64).saturating_sub(size);
                if *used + grows > limit {
                    return reply.error(self.inject(Errno::ENOSPC));
                }
                let r = write_full(&file, offset, data);
                if r.is_ok() {
                    *used += grows;
                }
                reply_written(reply, r);
            }
        }
    }

    fn do_sync(&self, file: Arc<File>, datasync: bool, reply: ReplyEmpty) {
        self.state.fsyncs.fetch_add(1, Ordering::Relaxed);
        let sync = move |reply: ReplyEmpty| {
            let r = if datasync { file.sync_data() } else { file.sync_all() };
            reply_empty(reply, r.map_err(io_err));
        };
        match self.gate(Kind::Sync) {
            Err(e) => reply.error(e),
            Ok(Gate::Stall(delay)) => self.stall(delay, move || sync(reply)),
            Ok(_) => self.syncs.run(Box::new(move || sync(reply))),
        }
    }

    fn do_opendir(&self, ino: INodeNo) -> R<u64> {
        let node = self.node(ino)?;
        let file = File::open(proc_path(&*node)).map_err(io_err)?;
        let parent = if ino.0 == ROOT_ID {
            ROOT_ID
        } else {
            nix::sys::stat::fstatat(&*node, "..", AtFlags::empty())
                .map(|st| self.swap_root(st.st_ino))
                .unwrap_or(ROOT_ID)
        };
        let mut entries = vec![
            (OsString::from("."), ino.0, FileType::Directory),
            (OsString::from(".."), parent, FileType::Directory),
        ];
        for entry in std::fs::read_dir(proc_path(&file)).map_err(io_err)? {
            let entry = entry.map_err(io_err)?;
            let kind = match entry.file_type() {
                Ok(t) => FileType::from_std(t).unwrap_or(FileType::RegularFile),
                Err(_) => continue, // gone meanwhile
            };
            entries.push((entry.file_name(), self.swap_root(entry.ino()), kind));
        }
        let fh = self.new_fh();
        lock(&self.dirs).insert(fh, Arc::new(DirHandle { file, entries }));
        Ok(fh)
    }

    fn do_statfs(&self, reply: ReplyStatfs) {
        let s = match nix::sys::statvfs::fstatvfs(&*self.root_fd) {
            Ok(s) => s,
            Err(e) => return reply.error(nix_err(e)),
        };
        let frsize = s.fragment_size().max(1);
        let (mut blocks, mut bfree, mut bavail) = (s.blocks(), s.blocks_free(), s.blocks_available());
        match self.state.fault() {
            Fault::Enospc => (bfree, bavail) = (0, 0),
            Fault::Full { bytes } => {
                let used = *lock(&self.state.used);
                blocks = bytes / frsize;
                bfree = bytes.saturating_sub(used) / frsize;
                bavail = bfree;
            }
            _ => {}
        }
        reply.statfs(
            blocks,
            bfree,
            bavail,
            s.files(),
            s.files_free(),
            s.block_size() as u32,
            s.name_max() as u32,
            frsize as u32,
        );
    }
}

fn reply_written(reply: ReplyWrite, r: R<u32>) {
    match r {
        Ok(n) => reply.written(n),
        Err(e) => reply.error(e),
    }
}

fn reply_empty(reply: ReplyEmpty, r: R<()>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

fn reply_entry(reply: ReplyEntry, ttl: &Duration, r: R<FileAttr>) {
    match r {
        Ok(a) => reply.entry(ttl, &a, Generation(0)),
        Err(e) => reply.error(e),
    }
}

impl Filesystem for FaultFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.op();
        let r = self.node(parent).and_then(|dir| self.lookup_at(&dir, name));
        reply_entry(reply, &self.ttl, r);
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        if ino.0 == ROOT_ID {
            return;
        }
        let mut nodes = lock(&self.nodes);
        if let Some(n) = nodes.get_mut(&ino.0) {
            n.lookups = n.lookups.saturating_sub(nlookup);
            if n.lookups == 0 {
                nodes.remove(&ino.0);
            }
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.op();
        match self.node(ino).and_then(|fd| nix::sys::stat::fstat(&*fd).map_err(nix_err)) {
            Ok(st) => reply.attr(&self.ttl, &attr(&st, ino.0)),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        self.op();
        match self.do_setattr(ino, SetAttr { mode, uid, gid, size, atime, mtime, fh }) {
            Ok(a) => reply.attr(&self.ttl, &a),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.op();
        match self.node(ino).and_then(|fd| nix::fcntl::readlinkat(&*fd, "").map_err(nix_err)) {
            Ok(target) => reply.data(std::os::unix::ffi::OsStrExt::as_bytes(target.as_os_str())),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, rdev: u32, reply: ReplyEntry) {
        self.op();
        let r = self.gate(Kind::Create).and_then(|_| {
            let dir = self.node(parent)?;
            let kind = SFlag::from_bits_truncate(mode & libc::S_IFMT);
            let perm = Mode::from_bits_truncate(mode & !umask & 0o7777);
            nix::sys::stat::mknodat(&*dir, name, kind, perm, rdev.into()).map_err(nix_err)?;
            let a = self.lookup_at(&dir, name)?;
            if let Ok(fd) = self.node(a.ino) {
                self.chown_to_caller(req, &*fd);
            }
            Ok(a)
        });
        reply_entry(reply, &self.ttl, r);
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        self.op();
        let r = self.gate(Kind::Create).and_then(|_| {
            let dir = self.node(parent)?;
            nix::sys::stat::mkdirat(&*dir, name, Mode::from_bits_truncate(mode & !umask & 0o7777)).map_err(nix_err)?;
            let a = self.lookup_at(&dir, name)?;
            if let Ok(fd) = self.node(a.ino) {
                self.chown_to_caller(req, &*fd);
            }
            Ok(a)
        });
        reply_entry(reply, &self.ttl, r);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.op();
        let r = self.gate(Kind::Modify).and_then(|gate| {
            let dir = self.node(parent)?;
            let mut used = matches!(gate, Gate::Full(_)).then(|| lock(&self.state.used));
            let freed = if used.is_some() { Self::freed_by_removal(&dir, name) } else { 0 };
            nix::unistd::unlinkat(&*dir, name, nix::unistd::UnlinkatFlags::NoRemoveDir).map_err(nix_err)?;
            if let Some(u) = used.as_mut() {
                **u = u.saturating_sub(freed);
            }
            Ok(())
        });
        reply_empty(reply, r);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.op();
        let r = self.gate(Kind::Modify).and_then(|_| {
            let dir = self.node(parent)?;
            nix::unistd::unlinkat(&*dir, name, nix::unistd::UnlinkatFlags::RemoveDir).map_err(nix_err)
        });
        reply_empty(reply, r);
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        self.op();
        let r = self.gate(Kind::Create).and_then(|_| {
            let dir = self.node(parent)?;
            nix::unistd::symlinkat(target, &*dir, link_name).map_err(nix_err)?;
            let a = self.lookup_at(&dir, link_name)?;
            if let Ok(fd) = self.node(a.ino) {
                self.chown_to_caller(req, &*fd);
            }
            Ok(a)
        });
        reply_entry(reply, &self.ttl, r);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        self.op();
        let r = self.gate(Kind::Modify).and_then(|gate| {
            let from = self.node(parent)?;
            let to = self.node(newparent)?;
            let flags = nix::fcntl::RenameFlags::from_bits_truncate(flags.bits());
            let mut used = matches!(gate, Gate::Full(_)).then(|| lock(&self.state.used));
            let exchange = flags.contains(nix::fcntl::RenameFlags::RENAME_EXCHANGE);
            let freed = if used.is_some() && !exchange { Self::freed_by_removal(&to, newname) } else { 0 };
            nix::fcntl::renameat2(&*from, name, &*to, newname, flags).map_err(nix_err)?;
            if let Some(u) = used.as_mut() {
                **u = u.saturating_sub(freed);
            }
            Ok(())
        });
        reply_empty(reply, r);
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        self.op();
        let r = self.gate(Kind::Create).and_then(|_| {
            let node = self.node(ino)?;
            let dir = self.node(newparent)?;
            nix::unistd::linkat(AT_FDCWD, &proc_path(&*node), &*dir, newname, AtFlags::AT_SYMLINK_FOLLOW)
                .map_err(nix_err)?;
            self.lookup_at(&dir, newname)
        });
        reply_entry(reply, &self.ttl, r);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.op();
        match self.do_open(ino, flags.0) {
            Ok(fh) => reply.opened(FileHandle(fh), OPEN_FLAGS),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.op();
        self.state.reads.fetch_add(1, Ordering::Relaxed);
        match self.file(fh).and_then(|f| read_full(&f, offset, size).map_err(io_err)) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.op();
        self.state.writes.fetch_add(1, Ordering::Relaxed);
        self.do_write(fh, offset, data, reply);
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        self.op();
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.op();
        lock(&self.files).remove(&fh.0);
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        self.op();
        match self.file(fh) {
            Ok(file) => self.do_sync(file, datasync, reply),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.op();
        match self.do_opendir(ino) {
            Ok(fh) => reply.opened(FileHandle(fh), OPEN_FLAGS),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        self.op();
        let dir = match self.dir(fh) {
            Ok(d) => d,
            Err(e) => return reply.error(e),
        };
        for (i, (name, ino, kind)) in dir.entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), i as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.op();
        lock(&self.dirs).remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        self.op();
        match self.dir(fh).and_then(|d| d.file.try_clone().map_err(io_err)) {
            Ok(file) => self.do_sync(Arc::new(file), datasync, reply),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.op();
        self.do_statfs(reply);
    }

    // Extended attributes are not provided. ENOSYS (rather than fuser's
    // default, which logs a warning for each call) makes the kernel stop
    // asking and answer EOPNOTSUPP itself.
    fn getxattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, _size: u32, reply: fuser::ReplyXattr) {
        self.op();
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: fuser::ReplyXattr) {
        self.op();
        reply.error(Errno::ENOSYS);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        self.op();
        reply.error(Errno::ENOSYS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        self.op();
        reply.error(Errno::ENOSYS);
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        self.op();
        if mask.contains(AccessFlags::W_OK) && self.state.fault() == Fault::ReadOnly {
            return reply.error(self.inject(Errno::EROFS));
        }
        let r = self.node(ino).and_then(|fd| {
            let mask = nix::unistd::AccessFlags::from_bits_truncate(mask.bits());
            nix::unistd::faccessat(AT_FDCWD, &proc_path(&*fd), mask, AtFlags::empty()).map_err(nix_err)
        });
        reply_empty(reply, r);
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        self.op();
        match self.do_create(req, parent, name, mode, umask, flags) {
            Ok((a, fh)) => reply.created(&self.ttl, &a, Generation(0), FileHandle(fh), OPEN_FLAGS),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.op();
        let r = self.file(fh).and_then(|file| {
            let flags = FallocateFlags::from_bits_truncate(mode);
            let size = file.metadata().map_err(io_err)?.len();
            let keeps_size =
                flags.intersects(FallocateFlags::FALLOC_FL_KEEP_SIZE | FallocateFlags::FALLOC_FL_PUNCH_HOLE);
            let grows = if keeps_size { 0 } else { (offset + length).saturating_sub(size) };
            // Any allocation can meet a full disk; only punching holes cannot.
            let allocates = !flags.contains(FallocateFlags::FALLOC_FL_PUNCH_HOLE);
            let gate = self.gate(Kind::Resize { grows: allocates })?;
            let mut used = None;
            if let Gate::Full(limit) = gate {
                let u = lock(&self.state.used);
                if *u + grows > limit {
                    return Err(self.inject(Errno::ENOSPC));
                }
                used = Some(u);
            }
            nix::fcntl::fallocate(&*file, flags, offset as i64, length as i64).map_err(nix_err)?;
            if let Some(mut u) = used {
                *u += grows;
            }
            Ok(())
        });
        reply_empty(reply, r);
    }
}

// ---------------------------------------------------------------------------
// Mounting, unmounting, the control socket
// ---------------------------------------------------------------------------

/// What [`mount`] needs.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// The directory whose contents are served.
    pub backing: PathBuf,
    /// An empty directory, not itself a mount point.
    pub mountpoint: PathBuf,
    /// Where to listen for control commands; `None` for none (in-process
    /// users call [`FaultMount::set`]).
    pub control: Option<PathBuf>,
    /// FUSE worker threads (each with its own cloned `/dev/fuse` fd). One
    /// is the fastest here (see the module doc); fsyncs and stalls run on
    /// threads of their own whatever this is.
    pub threads: usize,
    /// How long the kernel may cache attributes and names.
    pub attr_ttl: Duration,
}

impl MountOptions {
    pub fn new(backing: impl Into<PathBuf>, mountpoint: impl Into<PathBuf>) -> MountOptions {
        MountOptions {
            backing: backing.into(),
            mountpoint: mountpoint.into(),
            control: None,
            threads: 1,
            attr_ttl: Duration::from_secs(1),
        }
    }

    pub fn control(mut self, socket: impl Into<PathBuf>) -> MountOptions {
        self.control = Some(socket.into());
        self
    }
}

/// Why faultfs cannot run here, if it cannot: not root, or no `/dev/fuse`.
pub fn preflight() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("faultfs must run as root (it mounts with mount(2) itself)");
    }
    if !Path::new("/dev/fuse").exists() {
        bail!(
            "no /dev/fuse: FUSE is not available here (load the fuse module, or give the container --device /dev/fuse)"
        );
    }
    Ok(())
}

/// The filesystem type of the topmost mount at `path` (canonical), if it is
/// a mount point, from /proc/self/mountinfo.
fn mount_type(path: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = path.as_os_str().to_string_lossy();
    info.lines()
        .filter(|l| l.split(' ').nth(4).is_some_and(|m| unescape_mount_path(m) == want))
        .filter_map(|l| l.split_once(" - ").and_then(|(_, rest)| rest.split(' ').next()).map(str::to_string))
        .next_back()
}

fn is_mount_point(path: &Path) -> bool {
    mount_type(path).is_some()
}

/// /proc/self/mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_mount_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn check_paths(opts: &MountOptions) -> anyhow::Result<(PathBuf, PathBuf)> {
    let m = opts.mountpoint.display();
    match std::fs::metadata(&opts.mountpoint) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            bail!("stale FUSE mount at {m}: remove it with `faultfs umount {m}` (or `umount -l {m}`)")
        }
        Err(e) => bail!("mountpoint {m}: {e}"),
        Ok(meta) if !meta.is_dir() => bail!("mountpoint {m} is not a directory"),
        Ok(_) => {}
    }
    let mnt = opts.mountpoint.canonicalize().with_context(|| format!("mountpoint {m}"))?;
    if let Some(fstype) = mount_type(&mnt) {
        // The kernel may still answer stat from its cache; listing asks the server.
        let dead = std::fs::read_dir(&mnt).err().and_then(|e| e.raw_os_error()) == Some(libc::ENOTCONN);
        if fstype.starts_with("fuse") && dead {
            bail!("stale FUSE mount at {m}: remove it with `faultfs umount {m}` (or `umount -l {m}`)");
        }
        bail!("mountpoint {m} is busy: a {fstype} filesystem is already mounted there");
    }
    let backing =
        opts.backing.canonicalize().with_context(|| format!("backing directory {}", opts.backing.display()))?;
    if !backing.is_dir() {
        bail!("backing {} is not a directory", opts.backing.display());
    }
    if backing.starts_with(&mnt) || mnt.starts_with(&backing) {
        bail!("backing {} and mountpoint {m} must not contain one another", opts.backing.display());
    }
    Ok((backing, mnt))
}

/// The server end of the control socket: one command line per connection,
/// answered with one line (the status after the command, or `error: …`).
struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    fn start(path: &Path, state: Arc<State>) -> anyhow::Result<ControlServer> {
        let p = path.display();
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                bail!("control socket {p} is in use by a running faultfs");
            }
            std::fs::remove_file(path).with_context(|| format!("removing stale control socket {p}"))?;
        }
        let listener = UnixListener::bind(path).with_context(|| format!("control socket {p}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = thread::Builder::new()
            .name("faultfs-control".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if stop2.load(Ordering::SeqCst) {
                        break;
                    }
                    match conn {
                        Ok(conn) => {
                            if let Err(e) = serve_command(conn, &state) {
                                tracing::warn!(error = %e, "control connection failed");
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "control socket accept failed"),
                    }
                }
            })
            .context("spawning the control thread")?;
        Ok(ControlServer { path: path.to_path_buf(), stop, thread: Some(thread) })
    }

    fn shutdown(&mut self) {
        if let Some(t) = self.thread.take() {
            self.stop.store(true, Ordering::SeqCst);
            // Wakes the accept loop, which then sees `stop`.
            let _ = UnixStream::connect(&self.path);
            let _ = t.join();
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn serve_command(conn: UnixStream, state: &State) -> io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new(&conn).take(4096).read_line(&mut line)?;
    let answer = state.command(&line);
    (&conn).write_all(format!("{answer}\n").as_bytes())
}

/// Sends one control command (`ok`, `eio`, `stall 500`, `status`, …) to the
/// faultfs listening on `socket` and returns its one-line answer, the status
/// after the command. The new fault is in force when this returns.
pub fn control(socket: &Path, command: &str) -> anyhow::Result<String> {
    let mut conn = UnixStream::connect(socket).with_context(|| format!("control socket {}", socket.display()))?;
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    conn.write_all(format!("{}\n", command.trim()).as_bytes())?;
    conn.shutdown(std::net::Shutdown::Write)?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer).context("reading the control answer")?;
    let answer = answer.trim().to_string();
    if let Some(e) = answer.strip_prefix("error: ") {
        bail!("{e}");
    }
    if answer.is_empty() {
        bail!("faultfs at {} closed the control connection without answering", socket.display());
    }
    Ok(answer)
}

/// Removes the mount at `mountpoint`, a live one or the stale one a killed
/// faultfs left (`faultfs umount MNT`): a plain unmount, or a lazy one
/// while files are still open in it.
pub fn umount(mountpoint: &Path) -> anyhow::Result<()> {
    let m = mountpoint.display();
    match nix::mount::umount2(mountpoint, nix::mount::MntFlags::empty()) {
        Ok(()) => Ok(()),
        Err(NixErrno::EBUSY) => nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH)
            .with_context(|| format!("lazy unmount of {m}")),
        Err(NixErrno::EINVAL) => bail!("{m} is not a mount point"),
        Err(NixErrno::EPERM) => bail!("unmounting {m} needs root"),
        Err(e) => Err(e).with_context(|| format!("unmount of {m}")),
    }
}

/// Aborts FUSE connection `id` through fusectl, if fusectl is mounted (it
/// is where systemd runs; faultfs does not mount it). Open files of the
/// connection then fail with ENOTCONN.
fn abort_connection(id: u64) -> bool {
    std::fs::write(format!("/sys/fs/fuse/connections/{id}/abort"), "1").is_ok()
}

/// Signals the end of the FUSE session (the filesystem was unmounted).
#[derive(Clone, Default)]
struct Closed(Arc<(Mutex<bool>, Condvar)>);

impl Closed {
    fn set(&self) {
        *lock(&self.0 .0) = true;
        self.0 .1.notify_all();
    }

    /// Whether the session ended within `timeout`.
    fn wait(&self, timeout: Option<Duration>) -> bool {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut done = lock(&self.0 .0);
        while !*done {
            done = match deadline {
                None => self.0 .1.wait(done).unwrap_or_else(PoisonError::into_inner),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return false;
                    }
                    self.0 .1.wait_timeout(done, left).unwrap_or_else(PoisonError::into_inner).0
                }
            };
        }
        true
    }
}

/// A live faultfs mount. Dropping it unmounts (see [`FaultMount::unmount`]).
pub struct FaultMount {
    mountpoint: PathBuf,
    state: Arc<State>,
    session: Option<JoinHandle<io::Result<()>>>,
    closed: Closed,
    control: Option<ControlServer>,
    /// Kernel's FUSE connection number, for aborting it through fusectl
    /// when a lazy unmount leaves it open.
    connection: Option<u64>,
}

impl fmt::Debug for FaultMount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultMount").field("mountpoint", &self.mountpoint).finish_non_exhaustive()
    }
}

/// Mounts `opts.backing` at `opts.mountpoint` and serves it on background
/// threads until the returned handle is unmounted or dropped, or the mount
/// is removed from outside.
pub fn mount(opts: &MountOptions) -> anyhow::Result<FaultMount> {
    preflight()?;
    let (backing, mnt) = check_paths(opts)?;
    let state = Arc::new(State {
        backing: backing.clone(),
        fault: RwLock::new(Fault::Ok),
        used: Mutex::new(0),
        ops: AtomicU64::new(0),
        reads: AtomicU64::new(0),
        writes: AtomicU64::new(0),
        fsyncs: AtomicU64::new(0),
        injected: AtomicU64::new(0),
        stalled: AtomicU64::new(0),
    });
    let control = opts.control.as_deref().map(|p| ControlServer::start(p, state.clone())).transpose()?;
    let fs = FaultFs::new(&backing, state.clone(), opts.attr_ttl)
        .with_context(|| format!("opening backing directory {}", backing.display()))?;
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName("faultfs".into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::NoAtime,
    ];
    config.acl = fuser::SessionACL::All;
    config.n_threads = Some(opts.threads.max(1));
    config.clone_fd = true;
    let session =
        fuser::Session::new(fs, &mnt, &config).with_context(|| format!("mounting faultfs at {}", mnt.display()))?;
    let closed = Closed::default();
    let closed2 = closed.clone();
    let session = thread::Builder::new()
        .name("faultfs-session".into())
        .spawn(move || {
            let r = session.run();
            closed2.set();
            r
        })
        .context("spawning the FUSE session thread")?;
    let connection = std::fs::metadata(&mnt).ok().map(|m| {
        let dev = m.dev();
        (nix::sys::stat::major(dev) << 20) | nix::sys::stat::minor(dev)
    });
    tracing::info!(backing = %backing.display(), mountpoint = %mnt.display(), "faultfs mounted");
    Ok(FaultMount { mountpoint: mnt, state, session: Some(session), closed, control, connection })
}

impl FaultMount {
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Switches the fault; in force for every operation starting after this
    /// returns.
    pub fn set(&self, fault: Fault) -> anyhow::Result<()> {
        self.state.set(fault).with_context(|| format!("switching to {fault}"))
    }

    pub fn status(&self) -> Status {
        self.state.status()
    }

    /// Whether the FUSE session still runs (false once unmounted from outside).
    pub fn is_mounted(&self) -> bool {
        !self.closed.wait(Some(Duration::ZERO))
    }

    /// Blocks until the filesystem is unmounted, by anyone.
    pub fn wait(&self) {
        self.closed.wait(None);
    }

    /// Unmounts and waits for the session to end. While files are still
    /// open in the mount (EBUSY for about a second), it detaches lazily;
    /// if the session has not ended 2 s later, it aborts the FUSE
    /// connection where fusectl is mounted (open files then fail with
    /// ENOTCONN), else returns an error and leaves the session thread to
    /// serve the detached mount until its last file is closed (or the
    /// process exits, which ends the connection).
    pub fn unmount(mut self) -> anyhow::Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.control.take() {
            c.shutdown();
        }
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        let m = self.mountpoint.display();
        if !self.closed.wait(Some(Duration::ZERO)) {
            let mut result = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::empty());
            for _ in 0..20 {
                if result != Err(NixErrno::EBUSY) {
                    break;
                }
                thread::sleep(Duration::from_millis(50));
                result = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::empty());
            }
            match result {
                Ok(()) | Err(NixErrno::EINVAL) => {}
                Err(NixErrno::EBUSY) => {
                    tracing::warn!(mountpoint = %m, "files still open in the mount: detaching it lazily");
                    nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH)
                        .with_context(|| format!("lazy unmount of {m}"))?;
                }
                Err(e) => return Err(e).with_context(|| format!("unmount of {m}")),
            }
            if !self.closed.wait(Some(Duration::from_secs(2))) {
                tracing::warn!(mountpoint = %m, "files still open after 2 s: aborting the FUSE connection");
                let aborted = self.connection.is_some_and(abort_connection);
                if !aborted || !self.closed.wait(Some(Duration::from_secs(2))) {
                    // Leave the session thread to end when the last file closes.
                    bail!("{m} is detached but its FUSE session is still in use");
                }
            }
        }
        match session.join() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e).context("FUSE session ended with an error"),
            Err(_) => bail!("FUSE session thread panicked"),
        }
    }
}

impl Drop for FaultMount {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::warn!(error = format!("{e:#}"), "faultfs unmount failed");
        }
    }
}

/// `faultfs mount`: mounts, prints one line to stdout when ready, and serves
/// until the mount is removed from outside or SIGTERM, SIGINT or SIGHUP
/// arrives, then unmounts. Call it from `main` before any other thread is
/// started: those signals are blocked and taken with sigwait.
pub fn serve(opts: &MountOptions) -> anyhow::Result<()> {
    use nix::sys::signal::{SigSet, Signal};

    let mut signals = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP, Signal::SIGUSR1] {
        signals.add(s);
    }
    // Threads started from here on inherit the mask, so the signals stay
    // pending for the sigwait below.
    signals.thread_block().context("blocking signals")?;
    let mount = mount(opts)?;
    let closed = mount.closed.clone();
    thread::Builder::new()
        .name("faultfs-watch".into())
        .spawn(move || {
            closed.wait(None);
            // Unmounted from outside: wake the sigwait.
            let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), Signal::SIGUSR1);
        })
        .context("spawning the watcher thread")?;
    let control = opts.control.as_ref().map(|p| format!(", control {}", p.display())).unwrap_or_default();
    println!("faultfs: serving {} at {}{control}", opts.backing.display(), mount.mountpoint().display());
    io::stdout().flush()?;
    let signal = signals.wait().context("waiting for signals")?;
    if signal == Signal::SIGUSR1 {
        tracing::info!("mount removed from outside");
    } else {
        tracing::info!(%signal, "unmounting");
    }
    let mountpoint = mount.mountpoint().to_path_buf();
    match mount.unmount() {
        // Detached, but files are still open in it: our exit closes
        // /dev/fuse, which ends the connection (those files then fail
        // with ENOTCONN).
        Err(e) if !is_mount_point(&mountpoint) => {
            tracing::warn!(error = format!("{e:#}"), "exiting with files still open in the detached mount");
            Ok(())
        }
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_commands_parse_and_print_back() {
        for (text, fault) in [
            ("ok", Fault::Ok),
            ("eio", Fault::Eio),
            ("enospc", Fault::Enospc),
            ("readonly", Fault::ReadOnly),
            ("stall 500", Fault::Stall { ms: 500, writes: false }),
            ("stall 20 writes", Fault::Stall { ms: 20, writes: true }),
            ("full 1048576", Fault::Full { bytes: 1 << 20 }),
        ] {
            assert_eq!(text.parse::<Fault>().unwrap(), fault);
            assert_eq!(fault.to_string(), text);
        }
        assert_eq!(" full  64k ".parse::<Fault>().unwrap(), Fault::Full { bytes: 65536 });
        assert_eq!("full 2G".parse::<Fault>().unwrap(), Fault::Full { bytes: 2 << 30 });
        for bad in ["", "EIO", "stall", "stall -1", "stall 5 reads", "full", "full 1x", "full 99999999999999999g"] {
            assert!(bad.parse::<Fault>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn status_line_starts_with_the_mode() {
        let mut st = Status {
            fault: Fault::Stall { ms: 5, writes: true },
            ops: 1,
            reads: 2,
            writes: 3,
            fsyncs: 4,
            injected: 5,
            stalled: 6,
            used: None,
        };
        assert_eq!(
            st.to_string(),
            "mode=stall ms=5 stall_writes=yes ops=1 reads=2 writes=3 fsyncs=4 injected=5 stalled=6"
        );
        st.fault = Fault::Full { bytes: 10 };
        st.used = Some(7);
        assert!(st.to_string().starts_with("mode=full limit=10 used=7 ops=1 "));
    }

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape_mount_path(r"/tmp/a\040b\134c"), r"/tmp/a b\c");
        assert_eq!(unescape_mount_path(r"/plain"), "/plain");
        assert_eq!(unescape_mount_path(r"/end\04"), r"/end\04");
    }
}
