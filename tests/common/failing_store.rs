//! `FailingStore`: an `ObjectStore` around an inner store (a directory through
//! `LocalFileSystem`, or `InMemory`) whose deletes and writes fail on command, whose
//! deletes can be held at a gate (to catch one in flight), and which
//! counts every delete attempt per object, so tests can drive regcache's deletion
//! pipeline (I3) and write path (I2) through storage failures.
//!
//! Every method delegates to the inner store; the injections apply only to
//! deletes (`delete_stream`, path by path, which is what `ObjectStoreExt::delete` uses too),
//! to writes (`put_opts`, and through its `MultipartStore` the start and the parts of a
//! multipart upload) and, on command, to every read (`fail_reads`). Like the fixture upstream, it knows
//! nothing of regcache. Controls take `&self` and act at once; the state sits behind a
//! `std::sync::Mutex` never held across an `.await`.
//!
//! `async_trait` (which `ObjectStore` is declared with) is not a dependency of the tests,
//! so the async methods are written in its expanded form: a boxed `Send` future.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartId, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, Result,
};
use tokio::sync::{watch, Notify};

/// The boxed future `#[async_trait]` methods return.
type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The `store` name in injected errors, and the start of their message.
pub const INJECTED: &str = "injected failure";

/// One delete attempt the store saw.
#[derive(Clone, Debug)]
pub struct DeleteAttempt {
    pub at: Instant,
    /// Wall-clock time, comparable with regcache's unix-second columns.
    pub at_unix: SystemTime,
    /// Whether this attempt was failed on purpose.
    pub failed: bool,
}

#[derive(Debug, Default)]
struct State {
    /// Each object's next `n` delete attempts fail (counted per object from the command).
    fail_each: usize,
    failed_since_command: HashMap<Path, usize>,
    fail_forever: bool,
    attempts: HashMap<Path, Vec<DeleteAttempt>>,
    /// The next `n` writes (put or multipart start) fail.
    fail_puts: usize,
    puts_failed: usize,
    /// Objects written completely to the inner store.
    puts_done: Vec<Path>,
    /// While set, `put_opts` writes the object, records it, then never returns (until
    /// `release_puts`): the state a crash between writing an object and committing its
    /// row leaves behind, once the caller's future is dropped.
    hang_after_put: bool,
    hung_puts: usize,
    /// Every part of a multipart upload fails (without reaching the inner store).
    fail_parts: bool,
    /// Multipart uploads started, completed, aborted.
    multipart: [usize; 3],
    /// Every read (`get_opts`, which `head` goes through) fails, until `heal`.
    fail_reads: bool,
    /// Objects another writer puts just before the next put to their path: a race lost
    /// between a reader's check and its write.
    put_first: HashMap<Path, Bytes>,
}

/// See the module documentation.
pub struct FailingStore {
    inner: Arc<dyn ObjectStore>,
    /// The inner store's multipart API (S3), for `with_multipart`.
    inner_multipart: Option<Arc<dyn MultipartStore>>,
    state: Arc<Mutex<State>>,
    release: Arc<Notify>,
    /// `true`: deletes proceed; `false`: each waits here, before it counts as an attempt,
    /// until the gate opens.
    delete_gate: Arc<watch::Sender<bool>>,
}

impl fmt::Debug for FailingStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FailingStore")
            .field("inner", &self.inner.to_string())
            .finish_non_exhaustive()
    }
}

impl fmt::Display for FailingStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FailingStore({})", self.inner)
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Records a delete attempt on `path`; `Err` when it is to fail.
fn on_delete(state: &Mutex<State>, path: &Path) -> Result<()> {
    let mut s = lock(state);
    let fail = s.fail_forever || {
        let limit = s.fail_each;
        let failed = s.failed_since_command.entry(path.clone()).or_default();
        if *failed < limit {
            *failed += 1;
            true
        } else {
            false
        }
    };
    s.attempts.entry(path.clone()).or_default().push(DeleteAttempt {
        at: Instant::now(),
        at_unix: SystemTime::now(),
        failed: fail,
    });
    if fail {
        Err(injected("delete", path))
    } else {
        Ok(())
    }
}

fn injected(what: &str, path: &Path) -> object_store::Error {
    object_store::Error::Generic {
        store: "FailingStore",
        source: format!("{INJECTED}: {what} of {path}").into(),
    }
}

impl FailingStore {
    pub fn new(inner: Arc<dyn ObjectStore>) -> Arc<FailingStore> {
        Arc::new(FailingStore {
            inner,
            inner_multipart: None,
            state: Arc::default(),
            release: Arc::new(Notify::new()),
            delete_gate: Arc::new(watch::Sender::new(true)),
        })
    }

    /// Over a store with a multipart API (`AmazonS3`): regcache then uploads large blobs
    /// in parts through this store (see `blob_store`).
    pub fn with_multipart<S: ObjectStore + MultipartStore>(inner: Arc<S>) -> Arc<FailingStore> {
        Arc::new(FailingStore {
            inner: inner.clone(),
            inner_multipart: Some(inner),
            state: Arc::default(),
            release: Arc::new(Notify::new()),
            delete_gate: Arc::new(watch::Sender::new(true)),
        })
    }

    /// This store as regcache's blob store, with the multipart API when the inner store
    /// has one.
    pub fn blob_store(self: &Arc<Self>) -> regcache::storage::BlobStore {
        let store = regcache::storage::BlobStore::new(self.as_dyn(), String::new(), None, false);
        match self.inner_multipart {
            Some(_) => store.with_multipart(self.clone()),
            None => store,
        }
    }

    fn multipart_inner(&self) -> Result<&Arc<dyn MultipartStore>> {
        self.inner_multipart
            .as_ref()
            .ok_or_else(|| object_store::Error::Generic {
                store: "FailingStore",
                source: "the inner store has no multipart API (use with_multipart)".into(),
            })
    }

    /// Over a directory (created if missing), through `LocalFileSystem`.
    pub fn on_dir(dir: &std::path::Path) -> Arc<FailingStore> {
        std::fs::create_dir_all(dir).expect("creating the store directory");
        let fs = object_store::local::LocalFileSystem::new_with_prefix(dir)
            .expect("LocalFileSystem over the store directory");
        FailingStore::new(Arc::new(fs))
    }

    /// Over an `InMemory` store.
    pub fn in_memory() -> Arc<FailingStore> {
        FailingStore::new(Arc::new(object_store::memory::InMemory::new()))
    }

    /// This store as regcache takes it.
    pub fn as_dyn(self: &Arc<Self>) -> Arc<dyn ObjectStore> {
        self.clone()
    }

    pub fn inner(&self) -> &Arc<dyn ObjectStore> {
        &self.inner
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    // ----- deletes -----------------------------------------------------------------------

    /// From now on, the next `n` delete attempts of each object fail with a Generic error
    /// naming the object; its attempt `n + 1` goes through.
    pub fn fail_deletes(&self, n: usize) {
        let mut s = self.lock();
        s.fail_each = n;
        s.failed_since_command.clear();
    }

    /// Every delete fails until `heal`.
    pub fn fail_deletes_forever(&self) {
        self.lock().fail_forever = true;
    }

    /// From now on every delete waits, before reaching the inner store or counting as an
    /// attempt, until `unblock_deletes` (`heal` does not open the gate).
    pub fn block_deletes(&self) {
        self.delete_gate.send_replace(false);
    }

    /// Deletes held by `block_deletes` go on; later ones do not wait.
    pub fn unblock_deletes(&self) {
        self.delete_gate.send_replace(true);
    }

    /// Deletes (and writes) go through again.
    pub fn heal(&self) {
        let mut s = self.lock();
        s.fail_forever = false;
        s.fail_each = 0;
        s.failed_since_command.clear();
        s.fail_puts = 0;
        s.fail_parts = false;
        s.fail_reads = false;
    }

    /// Delete attempts of every object so far.
    pub fn delete_attempts(&self) -> usize {
        self.lock().attempts.values().map(Vec::len).sum()
    }

    /// Delete attempts that were failed on purpose.
    pub fn deletes_failed(&self) -> usize {
        self.lock()
            .attempts
            .values()
            .flatten()
            .filter(|a| a.failed)
            .count()
    }

    /// The delete attempts of one object, in order.
    pub fn attempts_of(&self, path: &Path) -> Vec<DeleteAttempt> {
        self.lock().attempts.get(path).cloned().unwrap_or_default()
    }

    /// Every object a delete was attempted on.
    pub fn deleted_paths(&self) -> Vec<Path> {
        self.lock().attempts.keys().cloned().collect()
    }

    // ----- reads -------------------------------------------------------------------------

    /// Every read (`get`, `head`, ranges) fails with a Generic error until `heal`: a store
    /// that no longer answers.
    pub fn fail_reads(&self) {
        self.lock().fail_reads = true;
    }

    // ----- writes ------------------------------------------------------------------------

    /// The next `n` writes (`put_opts` or the start of a multipart upload) fail.
    pub fn fail_puts(&self, n: usize) {
        self.lock().fail_puts = n;
    }

    /// Writes failed on purpose so far.
    pub fn puts_failed(&self) -> usize {
        self.lock().puts_failed
    }

    /// Objects written completely through `put_opts`, in order.
    pub fn puts_done(&self) -> Vec<Path> {
        self.lock().puts_done.clone()
    }

    /// From now on `put_opts` writes the object, then hangs until `release_puts` (or until
    /// the caller drops the future, as a crash or shutdown does).
    pub fn hang_after_put(&self) {
        self.lock().hang_after_put = true;
    }

    /// Puts that are hanging (or were, until dropped) after writing their object.
    pub fn hung_puts(&self) -> usize {
        self.lock().hung_puts
    }

    /// Stops hanging: hung puts return, later ones do not hang.
    pub fn release_puts(&self) {
        self.lock().hang_after_put = false;
        self.release.notify_waiters();
    }

    /// Every part of every multipart upload fails until `heal`; the upload itself starts.
    pub fn fail_parts(&self) {
        self.lock().fail_parts = true;
    }

    /// Multipart uploads (started, completed, aborted) so far. One started and neither
    /// completed nor aborted is an upload left open: on S3 its parts stay (and are billed)
    /// until a bucket lifecycle rule removes them.
    pub fn multipart_uploads(&self) -> (usize, usize, usize) {
        let [started, completed, aborted] = self.lock().multipart;
        (started, completed, aborted)
    }

    /// Just before the next put to `path`, another writer puts `bytes` there.
    pub fn put_first(&self, path: Path, bytes: Bytes) {
        self.lock().put_first.insert(path, bytes);
    }

    fn on_put(&self, path: &Path) -> Result<()> {
        let mut s = self.lock();
        if s.fail_puts > 0 {
            s.fail_puts -= 1;
            s.puts_failed += 1;
            return Err(injected("write", path));
        }
        Ok(())
    }

    /// Every object in the inner store (all prefixes), as `(path, size)`.
    pub async fn objects(&self) -> Vec<(Path, u64)> {
        let mut out: Vec<(Path, u64)> = self
            .inner
            .list(None)
            .map(|m| {
                let m = m.expect("listing the inner store");
                (m.location, m.size)
            })
            .collect()
            .await;
        out.sort();
        out
    }
}

impl ObjectStore for FailingStore {
    fn put_opts<'life0, 'life1, 'async_trait>(
        &'life0 self,
        location: &'life1 Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> BoxFut<'async_trait, Result<PutResult>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            self.on_put(location)?;
            let first = self.lock().put_first.remove(location);
            if let Some(bytes) = first {
                self.inner
                    .put_opts(location, PutPayload::from(bytes), PutOptions::default())
                    .await?;
            }
            let result = self.inner.put_opts(location, payload, opts).await?;
            let hang = {
                let mut s = self.lock();
                s.puts_done.push(location.clone());
                if s.hang_after_put {
                    s.hung_puts += 1;
                }
                s.hang_after_put
            };
            if hang {
                let released = self.release.notified();
                // `release_puts` may have run between the check and `notified()`.
                if self.lock().hang_after_put {
                    released.await;
                }
            }
            Ok(result)
        })
    }

    fn put_multipart_opts<'life0, 'life1, 'async_trait>(
        &'life0 self,
        location: &'life1 Path,
        opts: PutMultipartOptions,
    ) -> BoxFut<'async_trait, Result<Box<dyn MultipartUpload>>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        self.inner.put_multipart_opts(location, opts)
    }

    fn get_opts<'life0, 'life1, 'async_trait>(
        &'life0 self,
        location: &'life1 Path,
        options: GetOptions,
    ) -> BoxFut<'async_trait, Result<GetResult>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        if self.lock().fail_reads {
            let err = injected("read", location);
            return Box::pin(async move { Err(err) });
        }
        self.inner.get_opts(location, options)
    }

    fn get_ranges<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        location: &'life1 Path,
        ranges: &'life2 [Range<u64>],
    ) -> BoxFut<'async_trait, Result<Vec<Bytes>>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        if self.lock().fail_reads {
            let err = injected("read", location);
            return Box::pin(async move { Err(err) });
        }
        self.inner.get_ranges(location, ranges)
    }

    /// Each path in turn, once the delete gate is open: an injected failure yields its
    /// error, any other path is deleted by the inner store (so its not-found and other
    /// answers pass through unchanged).
    fn delete_stream(&self, locations: BoxStream<'static, Result<Path>>) -> BoxStream<'static, Result<Path>> {
        let (inner, state, gate) = (self.inner.clone(), self.state.clone(), self.delete_gate.clone());
        locations
            .then(move |location| {
                let (inner, state, gate) = (inner.clone(), state.clone(), gate.clone());
                async move {
                    let path = location?;
                    gate.subscribe()
                        .wait_for(|open| *open)
                        .await
                        .expect("the gate's sender lives as long as this stream");
                    on_delete(&state, &path)?;
                    let one = futures::stream::once(async move { Ok(path) }).boxed();
                    let mut results = inner.delete_stream(one);
                    results.next().await.unwrap_or_else(|| {
                        Err(object_store::Error::Generic {
                            store: "FailingStore",
                            source: "the inner store answered nothing for a delete".into(),
                        })
                    })
                }
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list_with_offset(prefix, offset)
    }

    fn list_with_delimiter<'life0, 'life1, 'async_trait>(
        &'life0 self,
        prefix: Option<&'life1 Path>,
    ) -> BoxFut<'async_trait, Result<ListResult>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        self.inner.list_with_delimiter(prefix)
    }

    fn copy_opts<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        from: &'life1 Path,
        to: &'life2 Path,
        options: CopyOptions,
    ) -> BoxFut<'async_trait, Result<()>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        self.inner.copy_opts(from, to, options)
    }

    fn rename_opts<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        from: &'life1 Path,
        to: &'life2 Path,
        options: RenameOptions,
    ) -> BoxFut<'async_trait, Result<()>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        self.inner.rename_opts(from, to, options)
    }
}

/// The inner store's multipart API, when it has one: starting an upload is a write
/// (`fail_puts` applies), parts fail on command (`fail_parts`), and uploads started,
/// completed and aborted are counted.
impl MultipartStore for FailingStore {
    fn create_multipart<'life0, 'life1, 'async_trait>(
        &'life0 self,
        path: &'life1 Path,
    ) -> BoxFut<'async_trait, Result<MultipartId>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            self.on_put(path)?;
            let id = self.multipart_inner()?.create_multipart(path).await?;
            self.lock().multipart[0] += 1;
            Ok(id)
        })
    }

    fn put_part<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        path: &'life1 Path,
        id: &'life2 MultipartId,
        part_idx: usize,
        data: PutPayload,
    ) -> BoxFut<'async_trait, Result<PartId>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            if self.lock().fail_parts {
                return Err(injected("part upload", path));
            }
            self.multipart_inner()?.put_part(path, id, part_idx, data).await
        })
    }

    fn complete_multipart<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        path: &'life1 Path,
        id: &'life2 MultipartId,
        parts: Vec<PartId>,
    ) -> BoxFut<'async_trait, Result<PutResult>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            let result = self
                .multipart_inner()?
                .complete_multipart(path, id, parts)
                .await?;
            self.lock().multipart[1] += 1;
            Ok(result)
        })
    }

    fn abort_multipart<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        path: &'life1 Path,
        id: &'life2 MultipartId,
    ) -> BoxFut<'async_trait, Result<()>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            self.lock().multipart[2] += 1;
            self.multipart_inner()?.abort_multipart(path, id).await
        })
    }
}
