//! Thread per core: client connections are spread over single-threaded runtimes.
//!
//! Why: on tokio's work-stealing runtime a connection's wake-ups cross threads and its
//! task moves between cores; at two threads that cost a fifth of the throughput against
//! HAProxy's and Nginx's thread-per-core designs (BENCHMARKS.md). Each worker here is a
//! thread with its own current-thread runtime and reactor, so a connection lives on one
//! thread from accept to close and the per-thread write batching (`batch.rs`) sees every
//! send of that thread. The thread that called [`Workers::start`] is worker 0; accept
//! loops, discovery, feedback and the admin listener stay on its runtime.

use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use anyhow::Context;
use tokio::net::TcpStream;
use tokio::runtime::{Handle, RuntimeFlavor};
use tokio::sync::oneshot;
use tokio::task::JoinSet;

thread_local! {
    /// Which worker this thread is (0: the thread that started the lb, or any thread
    /// of a multi-threaded runtime).
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// The worker running on this thread.
pub fn current() -> usize {
    WORKER.with(Cell::get)
}

/// The runtimes that serve client connections.
#[derive(Debug)]
pub struct Workers {
    /// Extra worker threads' runtimes (worker 0, the caller's, is not listed).
    extra: Vec<Handle>,
    /// Dropping a sender stops its thread's runtime (and the connections on it).
    stops: Mutex<Vec<oneshot::Sender<()>>>,
    /// The connections served on worker 0, whose runtime outlives the lb, so that
    /// stopping can end them (finished ones are reaped as new ones arrive).
    local: Mutex<JoinSet<()>>,
    next: AtomicUsize,
}

impl Workers {
    /// Starts `threads - 1` more single-threaded runtimes when the caller runs on a
    /// single-threaded one (`None`: one per core). On a multi-threaded runtime the
    /// connections stay on it and no thread is started.
    pub fn start(threads: Option<usize>) -> anyhow::Result<Workers> {
        let threads = threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        });
        let single = Handle::current().runtime_flavor() == RuntimeFlavor::CurrentThread;
        let mut extra = Vec::new();
        let mut stops = Vec::new();
        for i in 1..if single { threads } else { 1 } {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting a worker runtime")?;
            extra.push(runtime.handle().clone());
            let (stop, stopped) = oneshot::channel::<()>();
            stops.push(stop);
            std::thread::Builder::new()
                .name(format!("lb-worker-{i}"))
                .spawn(move || {
                    WORKER.with(|w| w.set(i));
                    let _ = runtime.block_on(stopped);
                    // Dropping the runtime here cancels its connections' tasks.
                })
                .context("starting a worker thread")?;
        }
        Ok(Workers {
            extra,
            stops: Mutex::new(stops),
            local: Mutex::new(JoinSet::new()),
            next: AtomicUsize::new(0),
        })
    }

    /// Number of threads serving connections.
    pub fn threads(&self) -> usize {
        self.extra.len() + 1
    }

    /// Serves an accepted connection on the next worker in turn.
    pub fn serve<F, Fut>(&self, stream: TcpStream, serve: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let n = self.threads();
        let at = if n == 1 {
            0
        } else {
            self.next.fetch_add(1, Ordering::Relaxed) % n
        };
        if at == 0 {
            let mut local = self.local.lock().unwrap_or_else(|p| p.into_inner());
            while local.try_join_next().is_some() {}
            local.spawn(serve(stream));
            return;
        }
        // The socket moves to the worker's reactor: out of this one, into that one.
        let std = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "handing a connection to a worker failed");
                return;
            }
        };
        self.extra[at - 1].spawn(async move {
            match TcpStream::from_std(std) {
                Ok(stream) => serve(stream).await,
                Err(e) => tracing::debug!(error = %e, "registering a connection failed"),
            }
        });
    }

    /// Ends every connection and stops the extra threads.
    pub fn stop(&self) {
        self.local
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .abort_all();
        self.stops.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop();
    }
}
