//! Appends frames and makes them durable with group commit.
//!
//! Committers append encoded frames to an in-memory buffer while holding the engine's
//! commit lock (so buffer order is LSN order). Whoever needs durability becomes the
//! *leader* if no fsync is running: it takes the whole buffer, writes it with one
//! `pwrite`, calls `fdatasync`, and publishes the new durable LSN. Committers that
//! arrive during that fsync wait and are covered together by the next leader, so
//! N concurrent durable commits cost about N / batch fsyncs, and a lone writer pays
//! exactly one per commit.
//!
//! Segments are preallocated and zero-filled (by a background thread for all but
//! the first), so `fdatasync` after a write never has to journal a size change.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex};

use super::format::{
    ChainHash, FORMAT_VERSION, FRAME_HEADER_LEN, SEGMENT_HEADER_LEN, SegmentHeader, encode_frame,
    segment_file_name,
};
use super::keys::{WalKeys, frame_aad};
use crate::crypto::{self, Aead};
use crate::error::AedbError;
use crate::storage::{OpenMode, Storage, StorageFile};

/// Pending bytes above which a `Visible` committer wakes the flusher early.
pub(crate) const SOFT_BUFFER_BYTES: usize = 4 << 20;
/// Pending bytes above which a committer writes the buffer out itself: the bound on
/// memory held by not-yet-written commits.
pub(crate) const HARD_BUFFER_BYTES: usize = 32 << 20;
/// Size of the first segment of a new database: small so that creating one is quick.
const INITIAL_SEGMENT_BYTES: u64 = 4 << 20;

/// A segment that will never be written again, as the manifest records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SealedSegment {
    pub index: u64,
    pub first_lsn: u64,
    pub last_lsn: u64,
    pub end_hash: ChainHash,
    /// Set when the segment is chained under another manifest key than the
    /// current one (it was kept across a key rotation).
    pub foreign: Option<ForeignChain>,
}

/// A segment chained under a rotated-away manifest key: the manifest, signed under
/// the current key, records that key's id and the digest of the segment's bytes up
/// to the end of its last frame, which authenticates it without the old key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ForeignChain {
    pub key_id: [u8; 8],
    pub sha256: [u8; 32],
}

/// Where the writer continues after recovery.
#[derive(Debug, Clone)]
pub(crate) struct WriterPosition {
    pub segment_index: u64,
    /// Offset in that segment where the next frame goes.
    pub offset: u64,
    pub last_lsn: u64,
    pub chain_head: ChainHash,
}

struct Pending {
    bytes: Vec<u8>,
    last_lsn: u64,
    chain_head: ChainHash,
    /// Offset in the current segment where the next appended frame will land.
    segment_offset: u64,
    segment_capacity: u64,
    segment_index: u64,
    segment_first_lsn: u64,
    cipher: Option<Aead>,
    /// Scratch buffer for encrypted payloads.
    sealed: Vec<u8>,
    /// Bytes appended since open (drives the checkpoint policy).
    appended_bytes: u64,
}

struct Io {
    file: Box<dyn StorageFile>,
    path: PathBuf,
    /// Offset up to which the buffer has been written to `file`.
    written_offset: u64,
    /// Offset up to which a completed `fdatasync` covers `file`. Only a write at
    /// this offset starts a batch: recovery reads a batch start as proof that
    /// everything before it was fsynced.
    synced_offset: u64,
    spare: Vec<u8>,
}

#[derive(Default)]
struct SyncState {
    durable_lsn: u64,
    written_lsn: u64,
    syncing: bool,
    failed: Option<String>,
    fsyncs: u64,
}

pub(crate) struct WalWriter {
    fs: Arc<dyn Storage>,
    dir: PathBuf,
    keys: WalKeys,
    segment_bytes: u64,
    pending: Mutex<Pending>,
    io: Mutex<Io>,
    sync: Mutex<SyncState>,
    synced: Condvar,
    preparing: Mutex<Option<JoinHandle<Result<PathBuf, AedbError>>>>,
    /// Segments sealed since the engine last asked (it records them in the manifest).
    newly_sealed: Mutex<Vec<SealedSegment>>,
}

impl std::fmt::Debug for WalWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WalWriter").field("dir", &self.dir).finish()
    }
}

fn prep_path(dir: &Path) -> PathBuf {
    dir.join("wal-next.prep")
}

impl WalWriter {
    /// Creates the first segment of a new database.
    /// Starts a new segment `index` whose first frame will be `first_lsn`, after a
    /// chain ending in `prev_hash`: for a new database, and after recovery when the
    /// last segment must not be written again (it is sealed or its keys changed).
    pub fn create(
        fs: Arc<dyn Storage>,
        dir: &Path,
        segment_bytes: u64,
        keys: WalKeys,
        index: u64,
        first_lsn: u64,
        prev_hash: ChainHash,
    ) -> Result<Self, AedbError> {
        let salt = crypto::random_bytes::<16>()?;
        let (_, key_id) = keys.writer_cipher(&salt);
        let header = SegmentHeader {
            version: FORMAT_VERSION,
            flags: keys.flags(),
            index,
            first_lsn,
            prev_hash,
            salt,
            key_id,
            chain_key_id: keys.chain_id,
        };
        let size = segment_bytes.min(INITIAL_SEGMENT_BYTES);
        let tmp = dir.join(format!("{}.tmp", segment_file_name(index)));
        zero_filled_file(&*fs, &tmp, size)?;
        let path = install_segment(&*fs, dir, &tmp, &header)?;
        let pos = WriterPosition {
            segment_index: index,
            offset: SEGMENT_HEADER_LEN as u64,
            last_lsn: first_lsn - 1,
            chain_head: prev_hash,
        };
        Self::resume_at(fs, dir, segment_bytes, keys, &path, pos, &header)
    }

    /// Continues an existing log at `pos` (from recovery).
    pub fn resume(
        fs: Arc<dyn Storage>,
        dir: &Path,
        segment_bytes: u64,
        keys: WalKeys,
        pos: WriterPosition,
        header: &SegmentHeader,
    ) -> Result<Self, AedbError> {
        let path = dir.join(segment_file_name(pos.segment_index));
        // What recovery read may still be only in the page cache (the process died,
        // the machine did not): make it durable before a batch start claims so.
        fs.open(&path, OpenMode::Write)
            .and_then(|f| f.sync_data())
            .map_err(|e| AedbError::io(&path, e))?;
        Self::resume_at(fs, dir, segment_bytes, keys, &path, pos, header)
    }

    fn resume_at(
        fs: Arc<dyn Storage>,
        dir: &Path,
        segment_bytes: u64,
        keys: WalKeys,
        path: &Path,
        pos: WriterPosition,
        header: &SegmentHeader,
    ) -> Result<Self, AedbError> {
        let cipher = keys
            .reader_cipher(header)
            .map_err(|reason| AedbError::KeyMismatch {
                file: path.to_path_buf(),
                reason,
            })?;
        let file = fs
            .open(path, OpenMode::Write)
            .map_err(|e| AedbError::io(path, e))?;
        let capacity = file.len().map_err(|e| AedbError::io(path, e))?;
        let w = Self {
            fs,
            dir: dir.to_path_buf(),
            keys,
            segment_bytes,
            pending: Mutex::new(Pending {
                bytes: Vec::with_capacity(64 * 1024),
                last_lsn: pos.last_lsn,
                chain_head: pos.chain_head,
                segment_offset: pos.offset,
                segment_capacity: capacity,
                segment_index: pos.segment_index,
                segment_first_lsn: header.first_lsn,
                cipher,
                sealed: Vec::new(),
                appended_bytes: 0,
            }),
            io: Mutex::new(Io {
                file,
                path: path.to_path_buf(),
                written_offset: pos.offset,
                synced_offset: pos.offset,
                spare: Vec::with_capacity(64 * 1024),
            }),
            sync: Mutex::new(SyncState {
                durable_lsn: pos.last_lsn,
                written_lsn: pos.last_lsn,
                ..SyncState::default()
            }),
            synced: Condvar::new(),
            preparing: Mutex::new(None),
            newly_sealed: Mutex::new(Vec::new()),
        };
        w.start_preparing_next();
        Ok(w)
    }

    fn start_preparing_next(&self) {
        // Without background I/O the next segment is prepared inline at rotation.
        if !self.fs.background_io() {
            return;
        }
        let path = prep_path(&self.dir);
        let size = self.segment_bytes;
        let fs = self.fs.clone();
        let handle = std::thread::Builder::new()
            .name("aedb-wal-prep".into())
            .spawn(move || zero_filled_file(&*fs, &path, size).map(|()| path));
        *self.preparing.lock() = handle.ok();
    }

    /// Fails fast once an earlier write or fsync failed: after a failed fsync the
    /// page cache can no longer be trusted to match the file.
    pub fn check_healthy(&self) -> Result<(), AedbError> {
        match &self.sync.lock().failed {
            Some(e) => Err(AedbError::Poisoned(e.clone())),
            None => Ok(()),
        }
    }

    /// Refuses all further commits (the in-memory state and the log disagree).
    pub fn poison(&self, e: &AedbError) {
        tracing::error!(error = %e, "refusing further commits until the database is reopened");
        // The first failure is the cause worth reporting; later ones follow from it.
        self.sync.lock().failed.get_or_insert_with(|| e.to_string());
        self.synced.notify_all();
    }

    fn frame_len(&self, payload_len: usize) -> u64 {
        let overhead = if self.keys.frame.is_some() {
            ring::aead::NONCE_LEN + crypto::TAG_LEN
        } else {
            0
        };
        (FRAME_HEADER_LEN + payload_len + overhead) as u64
    }

    /// Makes room for the next frame (`payload_len` bytes before encryption):
    /// seals the current segment and continues in a new one if it would not fit.
    /// The engine calls this and records the sealed segment in the manifest before
    /// it appends, so a failed manifest write never leaves a frame behind.
    pub fn make_room(&self, payload_len: usize) -> Result<(), AedbError> {
        self.check_healthy()?;
        let frame_len = self.frame_len(payload_len);
        let next_lsn = {
            let p = self.pending.lock();
            if p.segment_offset + frame_len <= p.segment_capacity {
                return Ok(());
            }
            p.last_lsn + 1
        };
        // A half-done rotation leaves the segment files and the writer's idea of
        // them in an unknown state: never continue past it.
        self.rotate(next_lsn, frame_len)
            .inspect_err(|e| self.poison(e))
    }

    /// Appends a frame for `lsn`. Must be called with LSNs in order (the engine holds
    /// its commit lock). Returns the pending-buffer size after the append. On error
    /// nothing was appended.
    pub fn append(&self, lsn: u64, payload: &[u8]) -> Result<usize, AedbError> {
        self.make_room(payload.len())?;
        let mut p = self.pending.lock();
        let p = &mut *p;
        if p.last_lsn + 1 != lsn {
            // The engine's sequence and the log disagree: a bug, and whatever is
            // appended next would be wrong.
            let e = AedbError::Poisoned(format!(
                "WAL append out of order: LSN {lsn} after {}",
                p.last_lsn
            ));
            self.poison(&e);
            return Err(e);
        }
        let prev = p.chain_head;
        let body: &[u8] = match &p.cipher {
            Some(c) => {
                p.sealed.clear();
                c.seal_random(&frame_aad(lsn), payload, &mut p.sealed)?;
                &p.sealed
            }
            None => payload,
        };
        p.chain_head = encode_frame(&mut p.bytes, self.keys.chain.as_ref(), &prev, lsn, body);
        p.last_lsn = lsn;
        let written = (FRAME_HEADER_LEN + body.len()) as u64;
        p.segment_offset += written;
        p.appended_bytes += written;
        Ok(p.bytes.len())
    }

    /// Closes the current segment (everything in it made durable) and continues in a
    /// new one that starts with `first_lsn`.
    fn rotate(&self, first_lsn: u64, frame_len: u64) -> Result<(), AedbError> {
        let last = self.pending.lock().last_lsn;
        self.wait_durable(last)?;
        let prepared = self.preparing.lock().take();
        let prepared_path = match prepared.map(|h| h.join()) {
            Some(Ok(Ok(path))) => Some(path),
            Some(Ok(Err(e))) => {
                tracing::warn!(error = %e, "background segment preparation failed; preparing inline");
                None
            }
            Some(Err(_)) | None => None,
        };
        let (index, prev_hash) = {
            let p = self.pending.lock();
            self.newly_sealed.lock().push(SealedSegment {
                index: p.segment_index,
                first_lsn: p.segment_first_lsn,
                last_lsn: p.last_lsn,
                end_hash: p.chain_head,
                foreign: None,
            });
            (p.segment_index + 1, p.chain_head)
        };
        let needed = SEGMENT_HEADER_LEN as u64 + frame_len;
        let tmp = match prepared_path {
            Some(p) if self.segment_bytes >= needed => p,
            _ => {
                let tmp = prep_path(&self.dir);
                zero_filled_file(&*self.fs, &tmp, self.segment_bytes.max(needed))?;
                tmp
            }
        };
        let salt = crypto::random_bytes::<16>()?;
        let (cipher, key_id) = self.keys.writer_cipher(&salt);
        let header = SegmentHeader {
            version: FORMAT_VERSION,
            flags: self.keys.flags(),
            index,
            first_lsn,
            prev_hash,
            salt,
            key_id,
            chain_key_id: self.keys.chain_id,
        };
        let path = install_segment(&*self.fs, &self.dir, &tmp, &header)?;
        let file = self
            .fs
            .open(&path, OpenMode::Write)
            .map_err(|e| AedbError::io(&path, e))?;
        let capacity = file.len().map_err(|e| AedbError::io(&path, e))?;
        {
            let mut io = self.io.lock();
            io.file = file;
            io.path = path;
            io.written_offset = SEGMENT_HEADER_LEN as u64;
            io.synced_offset = SEGMENT_HEADER_LEN as u64;
        }
        {
            let mut p = self.pending.lock();
            debug_assert!(p.bytes.is_empty(), "rotation after a full flush");
            p.segment_index = index;
            p.segment_offset = SEGMENT_HEADER_LEN as u64;
            p.segment_capacity = capacity;
            p.segment_first_lsn = first_lsn;
            p.cipher = cipher;
        }
        self.start_preparing_next();
        Ok(())
    }

    /// Writes the pending buffer to the segment and, if `sync`, fdatasyncs it.
    /// Returns the highest LSN covered.
    fn flush(&self, sync: bool) -> Result<u64, AedbError> {
        let mut io = self.io.lock();
        // Nothing appended after a failure may reach the disk: a commit that failed
        // after its append must not become durable behind its caller's back.
        self.check_healthy()?;
        let io = &mut *io;
        let upto = {
            let mut p = self.pending.lock();
            std::mem::swap(&mut p.bytes, &mut io.spare);
            p.last_lsn
        };
        if !io.spare.is_empty() {
            // The buffer starts with a frame header. It starts a batch only if all
            // before it is fsynced; after an unsynced write-out the earlier frames
            // may still tear, and the batch continues until the next fsync.
            if io.written_offset == io.synced_offset {
                io.spare[3] |= (super::format::BATCH_START >> 24) as u8;
            }
            io.file
                .write_all_at(&io.spare, io.written_offset)
                .map_err(|e| AedbError::io(&io.path, e))?;
            io.written_offset += io.spare.len() as u64;
            io.spare.clear();
            if io.spare.capacity() > SOFT_BUFFER_BYTES {
                io.spare.shrink_to(64 * 1024);
            }
        }
        if sync {
            io.file
                .sync_data()
                .map_err(|e| AedbError::io(&io.path, e))?;
            io.synced_offset = io.written_offset;
        }
        Ok(upto)
    }

    /// Returns once every frame up to `lsn` is on stable storage (group commit).
    /// An LSN not appended yet is refused: no fsync could ever cover it.
    pub fn wait_durable(&self, lsn: u64) -> Result<(), AedbError> {
        let last = self.last_lsn();
        if lsn > last {
            return Err(AedbError::InvalidArgument(format!(
                "sequence number {lsn} has not been issued (the log ends at {last})"
            )));
        }
        let mut s = self.sync.lock();
        loop {
            if let Some(e) = &s.failed {
                return Err(AedbError::Poisoned(e.clone()));
            }
            if s.durable_lsn >= lsn {
                return Ok(());
            }
            if s.syncing {
                self.synced.wait(&mut s);
                continue;
            }
            s.syncing = true;
            drop(s);
            let result = self.flush(true);
            s = self.sync.lock();
            s.syncing = false;
            match result {
                Ok(upto) => {
                    s.durable_lsn = s.durable_lsn.max(upto);
                    s.written_lsn = s.written_lsn.max(upto);
                    s.fsyncs += 1;
                }
                Err(e) => {
                    tracing::error!(error = %e, "WAL write or fsync failed; refusing further commits");
                    s.failed.get_or_insert_with(|| e.to_string());
                }
            }
            self.synced.notify_all();
        }
    }

    /// Hands buffered frames to the OS without an fsync (`OsBuffered`, memory bound).
    pub fn write_out(&self) -> Result<(), AedbError> {
        let upto = match self.flush(false) {
            Ok(upto) => upto,
            Err(e @ AedbError::Poisoned(_)) => return Err(e),
            Err(e) => {
                self.poison(&e);
                return Err(e);
            }
        };
        let mut s = self.sync.lock();
        s.written_lsn = s.written_lsn.max(upto);
        Ok(())
    }

    pub fn last_lsn(&self) -> u64 {
        self.pending.lock().last_lsn
    }

    pub fn durable_lsn(&self) -> u64 {
        self.sync.lock().durable_lsn
    }

    pub fn pending_bytes(&self) -> usize {
        self.pending.lock().bytes.len()
    }

    /// (index, first LSN) of the segment being written.
    pub fn active_segment(&self) -> (u64, u64) {
        let p = self.pending.lock();
        (p.segment_index, p.segment_first_lsn)
    }

    pub fn take_newly_sealed(&self) -> Vec<SealedSegment> {
        std::mem::take(&mut *self.newly_sealed.lock())
    }

    pub fn appended_bytes(&self) -> u64 {
        self.pending.lock().appended_bytes
    }

    /// (segment index, last LSN, chain head) of the log as appended so far.
    pub fn head(&self) -> (u64, u64, ChainHash) {
        let p = self.pending.lock();
        (p.segment_index, p.last_lsn, p.chain_head)
    }

    pub fn fsyncs(&self) -> u64 {
        self.sync.lock().fsyncs
    }

    /// Makes everything durable and stops background preparation.
    pub fn shutdown(&self) -> Result<(), AedbError> {
        let last = self.last_lsn();
        let r = self.wait_durable(last);
        if let Some(h) = self.preparing.lock().take() {
            let _ = h.join();
        }
        r
    }
}

/// Writes a zero-filled file of `size` bytes and fsyncs it.
fn zero_filled_file(fs: &dyn Storage, path: &Path, size: u64) -> Result<(), AedbError> {
    let f = fs
        .open(path, OpenMode::Create)
        .map_err(|e| AedbError::io(path, e))?;
    let chunk = vec![0u8; (1 << 20).min(size as usize)];
    let mut at = 0;
    while at < size {
        let n = (size - at).min(chunk.len() as u64) as usize;
        f.write_all_at(&chunk[..n], at)
            .map_err(|e| AedbError::io(path, e))?;
        at += n as u64;
    }
    f.sync_all().map_err(|e| AedbError::io(path, e))
}

/// Writes `header` into the prepared file `tmp` and renames it into place
/// crash-safely (fsync file, rename, fsync directory).
fn install_segment(
    fs: &dyn Storage,
    dir: &Path,
    tmp: &Path,
    header: &SegmentHeader,
) -> Result<PathBuf, AedbError> {
    let f = fs
        .open(tmp, OpenMode::Write)
        .map_err(|e| AedbError::io(tmp, e))?;
    f.write_all_at(&header.encode(), 0)
        .map_err(|e| AedbError::io(tmp, e))?;
    f.sync_data().map_err(|e| AedbError::io(tmp, e))?;
    let path = dir.join(segment_file_name(header.index));
    fs.rename(tmp, &path).map_err(|e| AedbError::io(&path, e))?;
    sync_dir(fs, dir)?;
    Ok(path)
}

pub(crate) fn sync_dir(fs: &dyn Storage, dir: &Path) -> Result<(), AedbError> {
    fs.sync_dir(dir).map_err(|e| AedbError::io(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RecoveryMode;
    use crate::wal::recovery::{ReplayStart, recover};

    fn no_keys() -> WalKeys {
        WalKeys::new(None, None, None)
    }

    /// Issue #13, bug 4: a write-out without an fsync (the 32 MiB buffer bound, the
    /// `OsBuffered` flusher) must not start a batch. Power fails during the fsync
    /// after it: the written-out frame lost a sector, the frame written just before
    /// the fsync reached the disk. Neither was acknowledged, so this is a torn tail
    /// that strict recovery cuts off, not damage in the middle of the log.
    #[test]
    fn unsynced_write_out_then_torn_frame_is_a_torn_tail() -> Result<(), AedbError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let w = WalWriter::create(
            crate::storage::os(),
            dir.path(),
            1 << 20,
            no_keys(),
            1,
            1,
            [0; 32],
        )?;
        w.append(1, b"acknowledged")?;
        w.wait_durable(1)?;
        w.append(2, &[b'x'; 300])?;
        w.write_out()?;
        w.append(3, b"in the interrupted fsync")?;
        w.wait_durable(3)?;
        w.shutdown()?;
        drop(w);

        let path = dir.path().join(segment_file_name(1));
        let mut buf = std::fs::read(&path).expect("read segment");
        let frame2 = SEGMENT_HEADER_LEN + FRAME_HEADER_LEN + b"acknowledged".len();
        // A lost sector inside frame 2's payload.
        for b in &mut buf[frame2 + FRAME_HEADER_LEN + 100..frame2 + FRAME_HEADER_LEN + 200] {
            *b = 0;
        }
        std::fs::write(&path, &buf).expect("write segment");

        let r = recover(
            &crate::storage::OsStorage,
            dir.path(),
            RecoveryMode::Strict,
            &no_keys(),
            ReplayStart::default(),
            |_, _| Ok(()),
        )
        .expect("an interrupted fsync is an ordinary power loss, strict must open");
        let torn = r.report.torn_tail.expect("torn tail reported");
        assert_eq!(torn.offset, frame2 as u64);
        assert_eq!(r.report.last_lsn, 1);
        Ok(())
    }
}
