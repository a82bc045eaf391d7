//! The data directory of the embedded backends (`[queue] path`): one SQLite database in WAL
//! mode holding the embedded queue's jobs and dead letters and the embedded cache's values
//! (answered markers, saved answers, progress, history, quotas), so `kill -9` of
//! `parley serve` loses no accepted job and repeats no answer. The in-process queue and map
//! stay the working copies; the database is written through and read back only at start.
//! Concurrent callers' writes are committed in the order they were handed over, one
//! transaction per batch (group commit): the first caller with nothing being committed
//! starts a committer task, which runs after the tasks already running have handed over
//! theirs; a caller's write returns once it is committed. A commit only appends to the
//! WAL; a thread of its own copies the WAL into the database twice a second (checkpoint),
//! so no commit waits for that. With `fsync = false` (the default) a commit reaches the
//! operating system before it returns, which survives the process's crash; `fsync = true`
//! also waits for the disk, which survives a power loss. A lock file keeps a second
//! process out.

use crate::job::Job;
use rusqlite::{Connection, OptionalExtension, params};
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

/// The database file inside the data directory.
pub const DB_FILE: &str = "parley.db";
/// Held locked (advisory) while a process uses the directory.
const LOCK_FILE: &str = "parley.lock";
/// The schema this build writes; a newer one is refused rather than misread.
const SCHEMA_VERSION: i64 = 1;
/// Expired cache values are deleted from the database this often.
const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// At most this many callers' writes go into one transaction.
const MAX_BATCH: usize = 1024;
/// How often the checkpointer copies the WAL into the database.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);
/// A WAL file larger than this is cut back to it once checkpointed.
const WAL_KEEP_BYTES: i64 = 64 << 20;

/// Why the data directory could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The directory or its files could not be created or opened.
    #[error("data directory {path}: {source}")]
    Io {
        /// The directory.
        path: String,
        /// What the system said.
        source: std::io::Error,
    },
    /// Another process holds the directory.
    #[error(
        "data directory {0} is in use by another parley process (one `parley serve` per directory)"
    )]
    Locked(String),
    /// The database was written by a newer Parley.
    #[error(
        "data directory {path}: schema version {found} is newer than this build's {SCHEMA_VERSION}"
    )]
    NewerSchema {
        /// The directory.
        path: String,
        /// The version found.
        found: i64,
    },
    /// SQLite failed (disk full, corrupt file, …).
    #[error("embedded store: {0}")]
    Sqlite(String),
    /// The store went away before the write was committed.
    #[error("embedded store is closed")]
    Closed,
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Sqlite(e.to_string())
    }
}

/// A cache value as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    /// A string (counters included).
    Str(String),
    /// A list, oldest first.
    List(Vec<String>),
}

/// A job as stored: waiting, taken, due for a retry, or dead.
#[derive(Debug, Clone)]
pub struct JobRow {
    /// Its place in the store, unique across lanes; also the order of arrival.
    pub seq: i64,
    /// The lane (`chat`, `notify`).
    pub lane: String,
    /// The job.
    pub job: Job,
    /// The attempt its next delivery is (for a dead letter: the attempts made).
    pub attempt: u32,
    /// Not to be delivered before this (ms since epoch; 0 = now).
    pub due_ms: i64,
    /// Set when dead-lettered: why, and when (ms since epoch).
    pub dead: Option<(String, i64)>,
}

/// A job as handed over: already serialized by the caller, so no copy of the job waits
/// in the batch.
#[derive(Debug, Clone)]
pub struct JobRecord {
    seq: i64,
    lane: &'static str,
    job: String,
    attempt: u32,
    due_ms: i64,
    dead: Option<(String, i64)>,
}

impl JobRecord {
    /// Job `job` of `lane` at `seq`, whose next delivery is `attempt`, due at `due_ms`
    /// (0 = now); `dead`: why and when it was dead-lettered.
    pub fn new(
        seq: i64,
        lane: &'static str,
        job: &Job,
        attempt: u32,
        due_ms: i64,
        dead: Option<(String, i64)>,
    ) -> Self {
        Self {
            seq,
            lane,
            job: serde_json::to_string(job).expect("jobs serialize"),
            attempt,
            due_ms,
            dead,
        }
    }
}

/// One change handed over.
#[derive(Debug, Clone)]
pub enum Write {
    /// A cache key's whole new value and its expiry (ms since epoch), or None to remove it.
    Value {
        /// The key.
        key: String,
        /// The value and when it expires.
        value: Option<(Stored, i64)>,
    },
    /// A job, new or changed.
    Job(JobRecord),
    /// A job that is done: removed.
    JobDone {
        /// Its seq.
        seq: i64,
    },
}

/// What the directory held at start.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Live cache values: key, value, expiry (ms since epoch).
    pub values: Vec<(String, Stored, i64)>,
    /// Jobs, oldest first.
    pub jobs: Vec<JobRow>,
}

impl Snapshot {
    /// Takes the jobs of `lane`, oldest first.
    pub fn take_jobs(&mut self, lane: &str) -> Vec<JobRow> {
        let (mine, rest) = std::mem::take(&mut self.jobs)
            .into_iter()
            .partition(|j| j.lane == lane);
        self.jobs = rest;
        mine
    }
}

type Done = tokio::sync::oneshot::Sender<Result<(), String>>;

/// A handle on the open data directory; clones share it.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    conn: Arc<Mutex<Connection>>,
    pending: Mutex<Pending>,
    /// Commit on the blocking pool (it waits for the disk) rather than in the task.
    fsync: bool,
    /// Dropped with the last handle, which ends the checkpointer thread.
    _checkpointer: mpsc::Sender<()>,
    next_seq: AtomicI64,
    path: PathBuf,
    /// Holds the directory's lock for as long as a handle lives.
    _lock: File,
}

/// Writes handed over and not yet taken by a committer.
struct Pending {
    writes: Vec<(Vec<Write>, Done)>,
    /// A committer task runs: it takes whatever is pending until nothing is.
    committing: bool,
    swept: Instant,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

/// A write handed over, to be waited for.
#[derive(Debug)]
pub struct Committed(tokio::sync::oneshot::Receiver<Result<(), String>>);

impl Committed {
    /// Waits until the write is committed.
    pub async fn wait(self) -> Result<(), StoreError> {
        self.await
    }
}

/// Dropping it stops the waiting, not the write: a write handed over is committed.
impl std::future::Future for Committed {
    type Output = Result<(), StoreError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx).map(|r| match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StoreError::Sqlite(e)),
            Err(_) => Err(StoreError::Closed),
        })
    }
}

impl Store {
    /// Opens (creating if needed) the data directory at `dir`, locks it, and reads back what
    /// it holds. `fsync`: wait for the disk on every commit.
    pub fn open(dir: &Path, fsync: bool) -> Result<(Store, Snapshot), StoreError> {
        let shown = dir.display().to_string();
        let io = |source| StoreError::Io {
            path: shown.clone(),
            source,
        };
        create_private_dir(dir).map_err(io)?;
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(LOCK_FILE))
            .map_err(io)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(StoreError::Locked(shown)),
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        let conn = Connection::open(dir.join(DB_FILE))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // Commits only append to the WAL; copying it into the database (and, even without
        // `fsync`, waiting for the disk then) is the checkpointer thread's, off the runtime.
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        conn.pragma_update(None, "journal_size_limit", WAL_KEEP_BYTES)?;
        conn.pragma_update(None, "synchronous", if fsync { "FULL" } else { "NORMAL" })?;
        conn.busy_timeout(Duration::from_secs(5))?;
        let found: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::NewerSchema { path: shown, found });
        }
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS kv (
                 key TEXT PRIMARY KEY, list INTEGER NOT NULL, value TEXT NOT NULL,
                 expires_ms INTEGER NOT NULL) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS jobs (
                 seq INTEGER PRIMARY KEY, lane TEXT NOT NULL, attempt INTEGER NOT NULL,
                 due_ms INTEGER NOT NULL, job TEXT NOT NULL, dead_reason TEXT,
                 dead_at_ms INTEGER);",
        )?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        let snapshot = read(&conn, &shown)?;
        let max_seq: Option<i64> = conn
            .query_row("SELECT MAX(seq) FROM jobs", [], |r| r.get(0))
            .optional()?
            .flatten();
        let (stop, stopped) = mpsc::channel::<()>();
        let checkpointer = Connection::open(dir.join(DB_FILE))?;
        checkpointer.busy_timeout(Duration::from_secs(5))?;
        std::thread::Builder::new()
            .name("parley-checkpoint".into())
            .spawn(move || checkpoint_loop(checkpointer, stopped))
            .map_err(io)?;
        tracing::info!(
            path = %shown,
            jobs = snapshot.jobs.len(),
            values = snapshot.values.len(),
            "embedded data directory opened"
        );
        let store = Store {
            inner: Arc::new(Inner {
                conn: Arc::new(Mutex::new(conn)),
                pending: Mutex::new(Pending {
                    writes: Vec::new(),
                    committing: false,
                    swept: Instant::now(),
                }),
                fsync,
                _checkpointer: stop,
                next_seq: AtomicI64::new(max_seq.unwrap_or(0) + 1),
                path: dir.to_path_buf(),
                _lock: lock,
            }),
        };
        Ok((store, snapshot))
    }

    /// A new job's seq.
    pub fn next_seq(&self) -> i64 {
        self.inner.next_seq.fetch_add(1, Ordering::SeqCst)
    }

    /// Hands `writes` over without waiting: writes handed over earlier are committed first
    /// (in the same transaction or an earlier one), so a caller holding a lock while it
    /// hands over keeps its order. Must be called within the runtime.
    pub fn submit(&self, writes: Vec<Write>) -> Committed {
        let (done, wait) = tokio::sync::oneshot::channel();
        let lead = {
            let mut pending = self.inner.pending.lock().unwrap();
            pending.writes.push((writes, done));
            !std::mem::replace(&mut pending.committing, true)
        };
        if lead {
            // A task of its own that first lets the tasks already ready run: by the time it
            // commits they have handed over their writes too, and one transaction takes all.
            let store = self.clone();
            tokio::spawn(async move {
                // Under load each round of the scheduler brings more: wait while it does
                // (a few rounds at most, microseconds each).
                let mut seen = 0;
                for _ in 0..4 {
                    tokio::task::yield_now().await;
                    let now = store.inner.pending.lock().unwrap().writes.len();
                    if now == seen {
                        break;
                    }
                    seen = now;
                }
                store.commit_pending().await
            });
        }
        Committed(wait)
    }

    /// Commits what is pending, batch after batch, until nothing is. Without `fsync` a
    /// commit only hands pages to the operating system (tens of microseconds for a batch),
    /// so it runs right here; with it, on the blocking pool.
    async fn commit_pending(self) {
        loop {
            let (batch, sweep) = {
                let mut pending = self.inner.pending.lock().unwrap();
                if pending.writes.is_empty() {
                    pending.committing = false;
                    return;
                }
                let sweep = pending.swept.elapsed() >= SWEEP_EVERY;
                if sweep {
                    pending.swept = Instant::now();
                }
                let n = pending.writes.len().min(MAX_BATCH);
                (pending.writes.drain(..n).collect::<Vec<_>>(), sweep)
            };
            let (writes, done): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
            let conn = self.inner.conn.clone();
            let run = move || {
                commit(&mut conn.lock().unwrap(), &writes, sweep).map_err(|e| e.to_string())
            };
            let result = match self.inner.fsync {
                false => run(),
                true => tokio::task::spawn_blocking(run)
                    .await
                    .unwrap_or_else(|e| Err(e.to_string())),
            };
            if let Err(e) = &result {
                tracing::error!(error = %e, "embedded store: a commit failed");
            }
            for done in done {
                let _ = done.send(result.clone());
            }
        }
    }

    /// Writes and waits until committed.
    pub async fn write(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        self.submit(writes).wait().await
    }
}

#[cfg(unix)]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(not(unix))]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)
}

fn read(conn: &Connection, shown: &str) -> Result<Snapshot, StoreError> {
    let now = crate::now_ms();
    let mut snapshot = Snapshot::default();
    let mut values =
        conn.prepare("SELECT key, list, value, expires_ms FROM kv WHERE expires_ms > ?1")?;
    let rows = values.query_map([now], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, bool>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, i64>(3)?,
        ))
    })?;
    for row in rows {
        let (key, list, value, expires_ms) = row?;
        let value = match list {
            false => Stored::Str(value),
            true => match serde_json::from_str(&value) {
                Ok(items) => Stored::List(items),
                Err(e) => {
                    tracing::error!(path = shown, error = %e, "embedded store: an unreadable list was skipped");
                    continue;
                }
            },
        };
        snapshot.values.push((key, value, expires_ms));
    }
    let mut jobs = conn.prepare(
        "SELECT seq, lane, attempt, due_ms, job, dead_reason, dead_at_ms FROM jobs ORDER BY seq",
    )?;
    let rows = jobs.query_map([], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, u32>(2)?,
            r.get::<_, i64>(3)?,
            r.get::<_, String>(4)?,
            r.get::<_, Option<String>>(5)?,
            r.get::<_, Option<i64>>(6)?,
        ))
    })?;
    for row in rows {
        let (seq, lane, attempt, due_ms, job, reason, at_ms) = row?;
        match serde_json::from_str::<Job>(&job) {
            Ok(job) => snapshot.jobs.push(JobRow {
                seq,
                lane,
                job,
                attempt,
                due_ms,
                dead: reason.map(|r| (r, at_ms.unwrap_or(0))),
            }),
            // Kept in the file for a build that can read it; never silently deleted.
            Err(e) => {
                tracing::error!(path = shown, seq, error = %e, "embedded store: an unreadable job was left in place")
            }
        }
    }
    Ok(snapshot)
}

/// Copies committed WAL frames into the database now and then, on a connection of its own
/// (PASSIVE: it never holds up a commit); once it has copied all, the next commit starts
/// the WAL over. Ends, with a last full checkpoint, when the store is dropped.
fn checkpoint_loop(conn: Connection, stop: mpsc::Receiver<()>) {
    let run = |mode: &str| {
        if let Err(e) = conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |_| Ok(())) {
            tracing::warn!(error = %e, "embedded store: a checkpoint failed; the WAL grows until one passes");
        }
    };
    while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(CHECKPOINT_EVERY) {
        run("PASSIVE");
    }
    run("TRUNCATE");
}

fn commit(conn: &mut Connection, batch: &[Vec<Write>], sweep: bool) -> Result<(), rusqlite::Error> {
    let tx = conn.transaction()?;
    {
        let mut put_value = tx.prepare_cached(
            "INSERT OR REPLACE INTO kv (key, list, value, expires_ms) VALUES (?1, ?2, ?3, ?4)",
        )?;
        let mut del_value = tx.prepare_cached("DELETE FROM kv WHERE key = ?1")?;
        let mut put_job = tx.prepare_cached(
            "INSERT OR REPLACE INTO jobs (seq, lane, attempt, due_ms, job, dead_reason, dead_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?;
        let mut del_job = tx.prepare_cached("DELETE FROM jobs WHERE seq = ?1")?;
        for write in batch.iter().flatten() {
            match write {
                Write::Value {
                    key,
                    value: Some((value, expires_ms)),
                } => {
                    let (list, text) = match value {
                        Stored::Str(s) => (false, s.clone()),
                        Stored::List(items) => (
                            true,
                            serde_json::to_string(items).expect("strings serialize"),
                        ),
                    };
                    put_value.execute(params![key, list, text, expires_ms])?;
                }
                Write::Value { key, value: None } => {
                    del_value.execute([key])?;
                }
                Write::Job(row) => {
                    let (reason, at) = match &row.dead {
                        Some((reason, at)) => (Some(reason.as_str()), Some(*at)),
                        None => (None, None),
                    };
                    put_job.execute(params![
                        row.seq,
                        row.lane,
                        row.attempt,
                        row.due_ms,
                        row.job,
                        reason,
                        at
                    ])?;
                }
                Write::JobDone { seq } => {
                    del_job.execute([seq])?;
                }
            }
        }
        if sweep {
            tx.execute("DELETE FROM kv WHERE expires_ms <= ?1", [crate::now_ms()])?;
        }
    }
    tx.commit()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::tests::sample_job;

    fn row(seq: i64, lane: &'static str, id: &str) -> JobRecord {
        JobRecord::new(seq, lane, &sample_job(id, "hi"), 1, 0, None)
    }

    #[tokio::test]
    async fn what_was_committed_is_read_back_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (store, snapshot) = Store::open(dir.path(), false).unwrap();
            assert!(snapshot.jobs.is_empty() && snapshot.values.is_empty());
            let far = crate::now_ms() + 60_000;
            store
                .write(vec![
                    Write::Job(row(store.next_seq(), "chat", "a")),
                    Write::Job(row(store.next_seq(), "notify", "b")),
                    Write::Job(row(store.next_seq(), "chat", "c")),
                    Write::Value {
                        key: "answered:a".into(),
                        value: Some((Stored::Str("1".into()), far)),
                    },
                    Write::Value {
                        key: "history:x".into(),
                        value: Some((Stored::List(vec!["u".into(), "v".into()]), far)),
                    },
                    Write::Value {
                        key: "gone".into(),
                        value: Some((Stored::Str("1".into()), crate::now_ms() - 1)),
                    },
                ])
                .await
                .unwrap();
            store.write(vec![Write::JobDone { seq: 1 }]).await.unwrap();
        }
        let (store, mut snapshot) = Store::open(dir.path(), false).unwrap();
        let chat: Vec<_> = snapshot
            .take_jobs("chat")
            .into_iter()
            .map(|j| j.job.id)
            .collect();
        assert_eq!(chat, ["c"]);
        assert_eq!(snapshot.take_jobs("notify").len(), 1);
        snapshot.values.sort_by(|a, b| a.0.cmp(&b.0));
        let keys: Vec<_> = snapshot.values.iter().map(|v| v.0.as_str()).collect();
        assert_eq!(
            keys,
            ["answered:a", "history:x"],
            "expired values are not read back"
        );
        assert_eq!(
            snapshot.values[1].1,
            Stored::List(vec!["u".into(), "v".into()])
        );
        assert_eq!(store.next_seq(), 4, "seqs go on after the highest kept");
    }

    #[tokio::test]
    async fn a_second_process_is_kept_out() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, _) = Store::open(dir.path(), false).unwrap();
        assert!(matches!(
            Store::open(dir.path(), false),
            Err(StoreError::Locked(_))
        ));
    }

    #[tokio::test]
    async fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path(), false).unwrap());
        let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        assert!(matches!(
            Store::open(dir.path(), false),
            Err(StoreError::NewerSchema { found: 99, .. })
        ));
    }
}
