//! Zero-copy forwarding between two TCP sockets with splice(2): bytes go socket → pipe → socket inside the kernel,
//! never through a user-space buffer. Each worker keeps a small pool of empty pipes, so a connection borrows one
//! per direction only while data flows and connection set-up costs no pipe syscalls.

use std::cell::RefCell;
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::Interest;
use tokio::net::TcpStream;

/// Pipes kept per worker thread; beyond this, returned pipes are closed.
const POOL_MAX: usize = 256;

/// A kernel pipe used as the splice buffer of one direction. `pending` bytes sit in it.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    pending: usize,
}

thread_local! {
    static POOL: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok(Pipe { read, write, pending: 0 })
    }

    /// An empty pipe from this worker's pool, or a new one.
    pub fn take() -> io::Result<Pipe> {
        match POOL.with(|p| p.borrow_mut().pop()) {
            Some(p) => Ok(p),
            None => Pipe::new(),
        }
    }

    /// Returns the pipe to the pool; a pipe still holding bytes is closed instead (its bytes belong to a dead
    /// connection).
    pub fn give_back(self) {
        if self.pending == 0 {
            POOL.with(|p| {
                let mut p = p.borrow_mut();
                if p.len() < POOL_MAX {
                    p.push(self);
                }
            });
        }
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain syscall on fds the caller keeps open; null offsets are valid for sockets and pipes.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

/// Forwards `src` to `dst` until EOF (then half-closes `dst`) or an error. `chunk` bounds the bytes in flight,
/// which is the back-pressure: nothing more is read until the pipe is drained into `dst`. `on_bytes` sees every
/// forwarded chunk (activity and byte counters).
///
/// `done` is shared by the two directions of a connection: the direction that reaches EOF second skips the
/// half-close, because both sockets are closed right after and the close sends the FIN (its read side is already
/// drained, so the close cannot turn into a reset).
pub async fn forward(
    src: &TcpStream,
    dst: &TcpStream,
    chunk: usize,
    done: &std::sync::atomic::AtomicBool,
    on_bytes: impl Fn(usize),
) -> io::Result<()> {
    let mut pipe: Option<Pipe> = None;
    let result = forward_with(src, dst, chunk, &mut pipe, done, &on_bytes).await;
    if let Some(p) = pipe {
        p.give_back();
    }
    result
}

async fn forward_with(
    src: &TcpStream,
    dst: &TcpStream,
    chunk: usize,
    slot: &mut Option<Pipe>,
    done: &std::sync::atomic::AtomicBool,
    on_bytes: &impl Fn(usize),
) -> io::Result<()> {
    loop {
        src.readable().await?;
        // Borrow a pipe only once there is something to move: idle connections hold none.
        let pipe = match slot {
            Some(p) => p,
            None => slot.insert(Pipe::take()?),
        };
        let n = match src.try_io(Interest::READABLE, || splice(src.as_raw_fd(), pipe.write.as_raw_fd(), chunk)) {
            Ok(0) => {
                // EOF: pass the half-close on; the other direction stays open. Second to finish: the close does it.
                if !done.swap(true, std::sync::atomic::Ordering::AcqRel) {
                    socket2::SockRef::from(dst).shutdown(Shutdown::Write)?;
                }
                return Ok(());
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        pipe.pending += n;
        while pipe.pending > 0 {
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || splice(pipe.read.as_raw_fd(), dst.as_raw_fd(), pipe.pending)) {
                Ok(m) => pipe.pending -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        on_bytes(n);
        // Hand the pipe back between bursts so a mostly idle connection does not keep one.
        if let Some(p) = slot.take() {
            p.give_back();
        }
    }
}
