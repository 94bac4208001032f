//! The byte relay between a client's and a server's TCP connection: each direction copies through a user-space buffer while its reads are small, and splices (splice(2) through a pipe, zero-copy) once a read fills the buffer; half-closes are passed on; the idle timeout counts blocked writes as no progress.
//!
//! Pipes come from a per-thread pool (no lock, no syscall to take one) and
//! are held only while bytes are in them: an idle connection holds none.
//! Each pipe's two descriptors are taken from the process's descriptor
//! budget (`crate::fds`); when it is spent the direction copies instead,
//! so splicing never costs a connection. A pipe is given back to the pool
//! only empty — one a relay leaves with bytes in it (an error, the idle
//! timeout) is closed, never reused.

use std::cell::RefCell;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rustix::pipe::{PipeFlags, SpliceFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::fds::{FdBudget, FdGuard};

/// Relay buffer per direction (copy mode); a read that fills it turns the
/// direction to splicing.
pub const RELAY_BUFFER: usize = 64 * 1024;

/// The capacity asked of each pipe (F_SETPIPE_SZ): the most one splice
/// round moves. A pipe that cannot have it (the system's
/// `fs.pipe-max-size`, the user's pipe pages) keeps the kernel's default.
pub const PIPE_SIZE: usize = 256 << 10;

/// Idle pipes a worker thread keeps for the next splice.
pub const POOL_PER_THREAD: usize = 32;

/// Pipes open now (in use or pooled), every thread.
pub static PIPES_OPEN: AtomicU64 = AtomicU64::new(0);
/// Pipes not made because the descriptor budget was spent (the direction copied).
pub static PIPES_REFUSED: AtomicU64 = AtomicU64::new(0);
/// Pipes that failed to be made (pipe2 failed: the system's limits).
pub static PIPE_ERRORS: AtomicU64 = AtomicU64::new(0);

/// How a relay moves bytes.
#[derive(Debug, Clone)]
pub struct RelayOptions {
    /// Idle timeout: the relay ends after this long without a byte moved.
    pub idle: Duration,
    /// Splice directions that move full buffers; `None`: always copy.
    pub splice: Option<Arc<FdBudget>>,
}

/// Bytes a relay moved.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Moved {
    /// Client → server, bytes written.
    pub up: u64,
    /// Server → client, bytes written.
    pub down: u64,
    /// Of those, bytes spliced (never in user space).
    pub spliced: u64,
}

/// A pipe with its descriptors' share of the budget.
#[derive(Debug)]
struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
    /// Its capacity, bytes.
    size: usize,
    _fds: FdGuard,
}

impl Drop for Pipe {
    fn drop(&mut self) {
        PIPES_OPEN.fetch_sub(1, Ordering::Relaxed);
    }
}

thread_local! {
    static POOL: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

impl Pipe {
    /// A pooled pipe of this thread, or a new one within `budget`.
    fn take(budget: &Arc<FdBudget>) -> Option<Pipe> {
        if let Some(p) = POOL.with(|p| p.borrow_mut().pop()) {
            return Some(p);
        }
        let Some(fds) = budget.take(2) else {
            PIPES_REFUSED.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        match rustix::pipe::pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK) {
            Ok((r, w)) => {
                PIPES_OPEN.fetch_add(1, Ordering::Relaxed);
                let size = rustix::pipe::fcntl_setpipe_size(&w, PIPE_SIZE)
                    .or_else(|_| rustix::pipe::fcntl_getpipe_size(&w))
                    .unwrap_or(RELAY_BUFFER);
                Some(Pipe {
                    r,
                    w,
                    size,
                    _fds: fds,
                })
            }
            Err(e) => {
                if PIPE_ERRORS.fetch_add(1, Ordering::Relaxed) == 0 {
                    log::warn!("pipe2: {e}: relaying by copy");
                }
                None
            }
        }
    }

    /// Back to this thread's pool — call only with the pipe empty.
    fn give_back(self) {
        POOL.with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < POOL_PER_THREAD {
                p.push(self);
            }
        });
    }
}

/// Empty pipes pooled on the calling thread.
pub fn pooled_here() -> usize {
    POOL.with(|p| p.borrow().len())
}

/// When a relay last moved a byte, shared by its two directions (atomics:
/// the task must be Send; both directions run on it, so Relaxed is enough).
#[derive(Clone, Copy)]
struct Progress<'a> {
    start: Instant,
    moved: &'a AtomicU64,
    /// One direction has ended (its end passed on).
    ended: &'a AtomicBool,
}

impl Progress<'_> {
    fn now(self) {
        self.moved
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// `r`'s stream ended: passes the end on to `w` as a half-close — unless
    /// the other direction has ended already, when the relay is over and
    /// closing `w` sends the FIN (nothing is left unread on it: its own
    /// stream was read to the end), one system call less per connection.
    fn end(self, w: &TcpStream) {
        if !self.ended.swap(true, Ordering::Relaxed) {
            let _ = socket2::SockRef::from(w).shutdown(std::net::Shutdown::Write);
        }
    }
}

/// Copies both ways until both sides have closed (half-closes passed on),
/// an error on either, or `idle` without a byte moved — read or written:
/// a peer that never reads blocks the other direction's writes, and those
/// count as no progress, so the connection (its SNAT port, its slot) ends
/// at the idle timeout instead of being held forever. The directions run
/// independently (one blocked writer does not stop the other reading).
pub async fn relay(a: TcpStream, b: TcpStream, opts: &RelayOptions) -> Moved {
    relay_from(a, b, opts, Vec::new()).await
}

/// As [`relay`], `pending` being bytes already read from `a` and not yet
/// written to `b` (the client's first bytes, when the connect did not take
/// them all): written first. Its allocation becomes that direction's buffer.
pub async fn relay_from(
    a: TcpStream,
    b: TcpStream,
    opts: &RelayOptions,
    pending: Vec<u8>,
) -> Moved {
    let start = Instant::now();
    let moved = AtomicU64::new(0);
    let (up, down, spliced) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let progress = Progress {
        start,
        moved: &moved,
        ended: &AtomicBool::new(false),
    };
    let both = async {
        tokio::try_join!(
            pump(&a, &b, opts, progress, &up, &spliced, pending),
            pump(&b, &a, opts, progress, &down, &spliced, Vec::new())
        )
    };
    let watchdog = async {
        loop {
            let deadline = start + Duration::from_millis(moved.load(Ordering::Relaxed)) + opts.idle;
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep_until(deadline).await;
        }
    };
    tokio::select! {
        _ = both => {}
        _ = watchdog => {}
    }
    Moved {
        up: up.load(Ordering::Relaxed),
        down: down.load(Ordering::Relaxed),
        spliced: spliced.load(Ordering::Relaxed),
    }
}

/// What a splice round ended with.
enum Round {
    /// `r` reached the end of its stream.
    End,
    /// Bytes moved (all of them written).
    Moved,
    /// No pipe to be had: copy instead.
    NoPipe,
}

/// One direction, `r` → `w`: copy rounds until a read fills the buffer,
/// then splice rounds (or copy rounds again while no pipe is to be had).
async fn pump(
    r: &TcpStream,
    w: &TcpStream,
    opts: &RelayOptions,
    moved: Progress<'_>,
    count: &AtomicU64,
    spliced: &AtomicU64,
    mut buf: Vec<u8>,
) -> io::Result<()> {
    let mut splicing = false;
    if !buf.is_empty() {
        write_all(w, &buf, moved, count).await?;
    }
    loop {
        if splicing {
            if let Some(budget) = &opts.splice {
                match splice_round(r, w, budget, moved, count, spliced).await? {
                    Round::End => {
                        moved.end(w);
                        return Ok(());
                    }
                    Round::Moved => continue,
                    Round::NoPipe => {} // this round by copy
                }
            }
        }
        r.readable().await?;
        if buf.capacity() == 0 {
            buf = Vec::with_capacity(RELAY_BUFFER); // never zeroed: read into
        }
        buf.clear();
        let n = match short_clears(r, Interest::READABLE, RELAY_BUFFER, |r| {
            rustix::io::read(r, rustix::buffer::spare_capacity(&mut buf))
        }) {
            Ok(0) => {
                moved.end(w);
                return Ok(());
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        moved.now();
        write_all(w, &buf[..n], moved, count).await?;
        if n == RELAY_BUFFER && opts.splice.is_some() {
            splicing = true;
        }
    }
}

/// Writes all of `bytes` to `w` (each partial write is progress).
async fn write_all(
    w: &TcpStream,
    bytes: &[u8],
    moved: Progress<'_>,
    count: &AtomicU64,
) -> io::Result<()> {
    let mut at = 0;
    while at < bytes.len() {
        w.writable().await?;
        match short_clears(w, Interest::WRITABLE, bytes.len() - at, |w| {
            rustix::io::write(w, &bytes[at..])
        }) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(k) => {
                at += k;
                count.fetch_add(k as u64, Ordering::Relaxed);
                moved.now();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One read(2) or write(2) on `s` by `op`, of `len` bytes at most, under
/// its readiness for `interest`. A short read drained the socket's
/// receive queue (TCP's recvmsg copies while data is queued); a short
/// write filled its send buffer (sendmsg copies while there is room): the
/// readiness is cleared then and there, as a `WouldBlock` would — saving
/// the call that would only say so. Race-free: tokio clears only if no
/// event came since the readiness was seen, and never clears the end of
/// a stream (a FIN or a reset keeps the socket readable).
fn short_clears(
    s: &TcpStream,
    interest: Interest,
    len: usize,
    op: impl FnOnce(&TcpStream) -> rustix::io::Result<usize>,
) -> io::Result<usize> {
    let mut done = 0;
    match s.try_io(interest, || {
        done = op(s)?;
        if done > 0 && done < len {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(done)
    }) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && done > 0 => Ok(done),
        other => other,
    }
}

/// A pipe a splice round holds, with the bytes in it: back to the pool
/// when dropped empty, closed when dropped with bytes in it (an error, the
/// idle timeout cancelling the relay) — stale bytes never reach another
/// connection.
struct Held {
    pipe: Option<Pipe>,
    pending: usize,
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(p) = self.pipe.take() {
            if self.pending == 0 {
                p.give_back();
            }
        }
    }
}

/// Waits for `r` to be readable, splices what it has into a pipe, and
/// splices the pipe into `w` until it is empty. A pipe is held only from
/// the read to the last write.
async fn splice_round(
    r: &TcpStream,
    w: &TcpStream,
    budget: &Arc<FdBudget>,
    moved: Progress<'_>,
    count: &AtomicU64,
    spliced: &AtomicU64,
) -> io::Result<Round> {
    let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
    let mut held = loop {
        r.readable().await?;
        let Some(pipe) = Pipe::take(budget) else {
            return Ok(Round::NoPipe);
        };
        // Not `short_clears`: a short splice does not mean the queue is
        // drained (a nonblocking splice returns after one pass over the
        // queue, which the pipe's slots can cut short).
        let got = r.try_io(Interest::READABLE, || {
            rustix::pipe::splice(r, None, &pipe.w, None, pipe.size, flags).map_err(io::Error::from)
        });
        let mut held = Held {
            pipe: Some(pipe),
            pending: 0,
        };
        match got {
            Ok(0) => return Ok(Round::End),
            Ok(n) => {
                held.pending = n;
                break held;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    };
    moved.now();
    while held.pending > 0 {
        w.writable().await?;
        let Some(p) = &held.pipe else {
            return Err(io::ErrorKind::BrokenPipe.into());
        };
        match w.try_io(Interest::WRITABLE, || {
            rustix::pipe::splice(&p.r, None, w, None, held.pending, flags).map_err(io::Error::from)
        }) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(k) => {
                held.pending -= k;
                count.fetch_add(k as u64, Ordering::Relaxed);
                spliced.fetch_add(k as u64, Ordering::Relaxed);
                moved.now();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Round::Moved)
}
