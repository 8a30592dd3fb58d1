//! Forwarding between two TCP sockets, zero-copy for bulk: bytes go socket → pipe → socket with splice(2) inside the
//! kernel, never through a user-space buffer. Each worker keeps a small pool of empty pipes, so a connection borrows
//! one per direction only while data flows and connection set-up costs no pipe syscalls.
//!
//! A direction starts in copy mode: recv into the worker's one buffer, send at once. Short request/response
//! exchanges then cost one recv and one send per message, and a short recv proves the socket drained (it clears the
//! readiness, as tokio's own reads do), which saves the read that would only return EAGAIN. Splicing a message
//! costs the same two calls plus that extra one, because a short splice proves nothing (the pipe may have run out
//! of slots). The first read that fills the buffer switches the direction to splice for good. When the source's FIN
//! is already in, the last bytes are held back (MSG_MORE) for the half-close, so bytes and FIN share one segment.

use std::cell::{Cell, RefCell};
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

/// The copy-mode buffer of a worker; a read that fills it marks the direction as bulk.
const COPY_BUF: usize = 16 * 1024;

thread_local! {
    static POOL: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
    static BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; COPY_BUF].into_boxed_slice());
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
    let mut bulk = false;
    let mut at_eof = false;
    loop {
        if at_eof {
            return half_close(dst, done);
        }
        let ready = src.ready(Interest::READABLE | Interest::ERROR).await?;
        let n = if bulk {
            match splice_in(src, chunk, slot) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        } else {
            let len = chunk.min(COPY_BUF);
            // The peer's FIN was already in when this read began, so a short read takes the last bytes before it:
            // the EOF is known without another recv that would return 0. (A reset shows as an error and is read
            // the normal way.) The one exception is TCP urgent data: a read also stops short at the urgent mark,
            // and what follows the mark would then be lost (telnet's Synch and FTP's abort are its only users).
            let fin_seen = ready.is_read_closed() && !ready.is_error();
            let (n, rest) = match copy_once(src, dst, len, fin_seen) {
                Ok(Copied { read, unsent, last }) => {
                    at_eof = last;
                    (read, unsent)
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            };
            let mut rest = &rest[..];
            while !rest.is_empty() {
                dst.writable().await?;
                match dst.try_write(rest) {
                    Ok(m) => rest = &rest[m..],
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            bulk = n == len;
            n
        };
        if n == 0 {
            return half_close(dst, done);
        }
        if bulk && let Some(pipe) = slot.as_mut() {
            while pipe.pending > 0 {
                dst.writable().await?;
                match dst.try_io(Interest::WRITABLE, || splice(pipe.read.as_raw_fd(), dst.as_raw_fd(), pipe.pending)) {
                    Ok(m) => pipe.pending -= m,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
        }
        on_bytes(n);
        // Hand the pipe back between bursts so a mostly idle connection does not keep one.
        if let Some(p) = slot.take() {
            p.give_back();
        }
    }
}

/// EOF read: pass the half-close on; the other direction stays open. Second to finish: the close does it.
fn half_close(dst: &TcpStream, done: &std::sync::atomic::AtomicBool) -> io::Result<()> {
    if !done.swap(true, std::sync::atomic::Ordering::AcqRel) {
        socket2::SockRef::from(dst).shutdown(Shutdown::Write)?;
    }
    Ok(())
}

/// One splice from `src` into the direction's pipe (borrowed now: idle connections hold none). 0 is EOF.
fn splice_in(src: &TcpStream, chunk: usize, slot: &mut Option<Pipe>) -> io::Result<usize> {
    let pipe = match slot {
        Some(p) => p,
        None => slot.insert(Pipe::take()?),
    };
    let n = src.try_io(Interest::READABLE, || splice(src.as_raw_fd(), pipe.write.as_raw_fd(), chunk))?;
    pipe.pending += n;
    Ok(n)
}

/// What one [`copy_once`] did.
struct Copied {
    /// Bytes read; 0 is EOF.
    read: usize,
    /// What `dst` did not take at once, to be written after waiting.
    unsent: Vec<u8>,
    /// These were the source's last bytes: its FIN is known to follow.
    last: bool,
}

/// One recv of up to `len` bytes into the worker's buffer and one send of them to `dst`.
///
/// `fin_seen`: the source's FIN was in before the recv, so a short read is its last data. The send then carries
/// MSG_MORE, which holds the bytes back until the half-close (or close) that follows at once, and the kernel sends
/// them and the FIN as one segment, as haproxy does; the peer then acknowledges both with one segment too. Without
/// it, each such response costs two more segments: the bytes, their ACK, and a bare FIN.
fn copy_once(src: &TcpStream, dst: &TcpStream, len: usize, fin_seen: bool) -> io::Result<Copied> {
    BUF.with(|buf| {
        let mut buf = buf.borrow_mut();
        let buf = &mut buf[..len];
        // A short read drained the socket: reporting WouldBlock to tokio clears the readiness (the closed state
        // survives), so the next wait is for new bytes instead of a recv that returns EAGAIN. The bytes read are
        // passed out beside the error.
        let short = Cell::new(None);
        let read = src.try_io(Interest::READABLE, || {
            // SAFETY: `buf` is a valid, writable region of `buf.len()` bytes for the whole call.
            let n = unsafe { libc::recv(src.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let n = n as usize;
            if n > 0 && n < len {
                short.set(Some(n));
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        let n = match (read, short.get()) {
            (_, Some(n)) => n,
            (read, None) => read?,
        };
        let last = fin_seen && n > 0 && n < len;
        let mut sent = 0;
        while sent < n {
            let sending = if last { send_more(dst, &buf[sent..n]) } else { dst.try_write(&buf[sent..n]) };
            match sending {
                Ok(m) => sent += m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(Copied { read: n, unsent: buf[sent..n].to_vec(), last })
    })
}

/// A send flagged MSG_MORE: the kernel keeps the bytes queued (corked) until a send without it, the half-close or
/// the close, so the FIN that comes next leaves in the same segment.
fn send_more(dst: &TcpStream, bytes: &[u8]) -> io::Result<usize> {
    dst.try_io(Interest::WRITABLE, || {
        // SAFETY: `bytes` is a valid, readable region of `bytes.len()` bytes for the whole call.
        let n = unsafe {
            libc::send(
                dst.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_MORE | libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
    })
}
