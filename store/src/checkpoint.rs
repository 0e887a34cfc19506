//! Index checkpoints (DESIGN.md section 5, "Hot standby": a restart reads
//! index checkpoints and the log after them, not every body).
//!
//! The writer thread writes the live index and the idempotence marks to
//! `index.ckpt` in the data directory now and then (see
//! [`CHECKPOINT_EVERY`]) and when it stops: a temporary file, fsync'd, then
//! renamed over the old one, after a sync of the store, so that a
//! checkpoint never describes records the store could lose. At open,
//! [`crate::Store`] loads it and applies only the records after it.
//!
//! A checkpoint describes one history of the log: it is deleted before a
//! snapshot from the peer replaces the log. One that is missing, of
//! another format, or unreadable is ignored (logged), and the whole log is
//! read as before. Records it covers are not read at open, so their
//! checksums are checked when they are read (delivery, snapshot, catch-up),
//! not at start.

use std::collections::HashMap;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::index::LiveIndex;
use crate::StoreError;

/// Layout of the checkpoint file.
pub(crate) const FORMAT: u8 = 2;
const FILE: &str = "index.ckpt";

/// How often the writer checkpoints while records arrive. A restart after
/// a crash reads the records written since (at most this long's worth).
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(30);

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Checkpoint {
    pub format: u8,
    /// Every record with a key up to this one is in `index`.
    pub through: u64,
    pub next_seq: u64,
    pub dedup: HashMap<u64, u64>,
    pub index: LiveIndex,
}

pub(crate) fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

/// Write `ckpt` (a [`Checkpoint`], possibly borrowed) durably in place of the previous one.
pub(crate) fn write_with(dir: &Path, ckpt: &impl Serialize) -> Result<u64, StoreError> {
    let io = |source: std::io::Error| StoreError::Io { op: "write the index checkpoint", source };
    let tmp = dir.join(format!("{FILE}.tmp"));
    let file = std::fs::File::create(&tmp).map_err(io)?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    rmp_serde::encode::write(&mut out, ckpt)
        .map_err(|source| StoreError::Encode { what: "the index checkpoint", source })?;
    out.flush().map_err(io)?;
    let file = out.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    let bytes = file.metadata().map_err(io)?.len();
    std::fs::rename(&tmp, path(dir)).map_err(io)?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    Ok(bytes)
}

/// The checkpoint at `dir`, if there is a usable one.
pub(crate) fn read(dir: &Path) -> Option<Checkpoint> {
    let file = match std::fs::File::open(path(dir)) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(error = %e, "cannot open the index checkpoint; reading the whole log");
            return None;
        }
    };
    match rmp_serde::decode::from_read::<_, Checkpoint>(BufReader::with_capacity(1 << 20, file)) {
        Ok(c) if c.format == FORMAT => Some(c),
        Ok(c) => {
            tracing::warn!(format = c.format, "index checkpoint of another format; reading the whole log");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "unreadable index checkpoint; reading the whole log");
            None
        }
    }
}

/// Forget the checkpoint (the log is about to be replaced).
pub(crate) fn remove(dir: &Path) -> Result<(), StoreError> {
    match std::fs::remove_file(path(dir)) {
        Ok(()) => std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| StoreError::Io { op: "fsync the data directory after the checkpoint", source }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(StoreError::Io { op: "rename the index checkpoint into place", source }),
    }
}
