//! Creating listen sockets on the main thread: SO_REUSEADDR always, SO_REUSEPORT with one socket per worker when
//! `enable_reuse_port`, IPV6_V6ONLY unless `ipv4_compat`, freebind, transparent, the listener's raw socket
//! options at the state they ask for, and the backlog. Workers only convert the result (`from_std`).
//!
//! Socket creation sits behind [`SocketFactory`] so tests can substitute failures. [`steer_by_cpu`] sets up Envoy's
//! `cpu_locality_balance` on bound reuse-port sockets.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;

use socket2::{Domain, Protocol, Socket, Type};

use crate::config::listener::{SocketOption, SocketOptionValue, SocketSpec, SocketState};

pub trait SocketFactory: Send + Sync + std::fmt::Debug {
    /// Binds `count` listening sockets for `spec` (all on the same port: when `spec.address` has port 0, the first
    /// socket's port is used for the rest). Sockets are non-blocking.
    fn bind(&self, spec: &SocketSpec, count: usize) -> io::Result<Vec<TcpListener>>;
}

#[derive(Debug, Default)]
pub struct SystemSockets;

impl SocketFactory for SystemSockets {
    fn bind(&self, spec: &SocketSpec, count: usize) -> io::Result<Vec<TcpListener>> {
        let count = if spec.reuse_port { count.max(1) } else { 1 };
        let mut out = Vec::with_capacity(count);
        let mut addr = spec.address;
        for _ in 0..count {
            let l = bind_one(spec, addr)?;
            addr = l.local_addr()?;
            out.push(l);
        }
        Ok(out)
    }
}

fn bind_one(spec: &SocketSpec, addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if spec.reuse_port {
        socket.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        socket.set_only_v6(!spec.ipv4_compat)?;
    }
    if spec.freebind {
        if addr.is_ipv6() { socket.set_freebind_v6(true)? } else { socket.set_freebind_v4(true)? }
    }
    if spec.transparent {
        if addr.is_ipv6() { socket.set_ip_transparent_v6(true)? } else { socket.set_ip_transparent_v4(true)? }
    }
    apply_options(&socket, &spec.socket_options, SocketState::Prebind)?;
    socket.bind(&addr.into())?;
    apply_options(&socket, &spec.socket_options, SocketState::Bound)?;
    let backlog = i32::try_from(spec.backlog).unwrap_or(i32::MAX);
    socket.listen(backlog)?;
    apply_options(&socket, &spec.socket_options, SocketState::Listening)?;
    // Envoy sets TCP_NODELAY on every accepted connection, whatever the listener's socket options say. Linux copies
    // it from the listening socket into each connection it accepts, so set here, after those options, it costs one
    // call per socket instead of one per connection.
    socket.set_tcp_nodelay(true)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Envoy's `cpu_locality_balance` on a listener's reuse-port sockets (socket i is worker i's): socket i takes the
/// connections received on `cpus[i]`, through SO_INCOMING_CPU, which the kernel's reuse-port selection honours since
/// Linux 6.2 (it ignored it before); a connection received on a CPU with no worker goes where the kernel's hash sends
/// it. Unlike a BPF program indexing the group, this does not depend on the group's order, which a rebind on the same
/// address reshuffles. `None` takes the steering off again.
pub fn steer_by_cpu(sockets: &[TcpListener], cpus: Option<&[usize]>) -> io::Result<()> {
    if let Some(cpus) = cpus {
        if cpus.len() != sockets.len() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "one socket per pinned worker is needed"));
        }
        if !kernel_at_least(6, 2) {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "needs Linux 6.2 or later"));
        }
    }
    for (i, socket) in sockets.iter().enumerate() {
        let cpu = match cpus {
            Some(cpus) => i32::try_from(cpus[i])
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "CPU number out of range"))?,
            None => -1,
        };
        // SAFETY: `cpu` is a live int for the whole call; the fd is open.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_INCOMING_CPU,
                std::ptr::from_ref(&cpu).cast(),
                std::mem::size_of::<i32>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Whether the running kernel's release is at least `major.minor`.
fn kernel_at_least(major: u32, minor: u32) -> bool {
    let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") else { return false };
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse::<u32>().ok());
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= (major, minor)
}

fn apply_options(socket: &Socket, options: &[SocketOption], state: SocketState) -> io::Result<()> {
    for o in options.iter().filter(|o| o.state == state) {
        let (ptr, len): (*const libc::c_void, usize) = match &o.value {
            SocketOptionValue::Int(v) => (std::ptr::from_ref(v).cast(), std::mem::size_of::<i32>()),
            SocketOptionValue::Bytes(b) => (b.as_ptr().cast(), b.len()),
        };
        let len = libc::socklen_t::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "socket option value too long"))?;
        // SAFETY: `ptr`/`len` describe memory owned by `o` that outlives the call; the fd is open.
        let rc = unsafe { libc::setsockopt(socket.as_raw_fd(), o.level, o.name, ptr, len) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("setsockopt(level={}, name={}): {e}", o.level, o.name)));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(addr: &str, reuse_port: bool) -> SocketSpec {
        SocketSpec {
            address: addr.parse().unwrap_or_else(|_| unreachable!()),
            reuse_port,
            backlog: 128,
            freebind: false,
            transparent: false,
            ipv4_compat: false,
            socket_options: vec![],
        }
    }

    /// A reuse-port spec on a free loopback port with one raw socket option.
    fn with_option(level: i32, name: i32, value: i32, state: SocketState) -> SocketSpec {
        let mut s = spec("127.0.0.1:0", true);
        s.socket_options.push(SocketOption { level, name, value: SocketOptionValue::Int(value), state });
        s
    }

    /// Which of `socks` has the connection just made waiting (accepting it), polled for up to a second.
    fn accepting(socks: &[TcpListener]) -> Vec<usize> {
        let end = std::time::Instant::now() + std::time::Duration::from_secs(1);
        loop {
            let ready: Vec<usize> =
                socks.iter().enumerate().filter(|(_, s)| s.accept().is_ok()).map(|(i, _)| i).collect();
            if !ready.is_empty() || std::time::Instant::now() > end {
                return ready;
            }
            std::thread::yield_now();
        }
    }

    /// Envoy's cpu_locality_balance: a connection made from a thread on worker i's CPU (on loopback the SYN is
    /// handled on the connecting CPU) waits on socket i, whichever of the group the kernel's hash would pick; with the
    /// steering taken off the hash decides again.
    #[test]
    fn cpu_steering_queues_each_connection_on_its_cpus_socket() -> io::Result<()> {
        if !kernel_at_least(6, 2) {
            let socks = SystemSockets.bind(&spec("127.0.0.1:0", true), 1)?;
            let err = steer_by_cpu(&socks, Some(&[0])).err().map(|e| e.kind());
            assert_eq!(err, Some(io::ErrorKind::Unsupported), "refused before Linux 6.2");
            return Ok(());
        }
        let allowed = crate::listener::worker::allowed_cpus()?;
        let cpus = &allowed[..allowed.len().min(2)];
        let socks = SystemSockets.bind(&spec("127.0.0.1:0", true), cpus.len())?;
        let addr = socks[0].local_addr()?;
        let connect_from_each = |rounds: usize| {
            std::thread::scope(|scope| {
                scope
                    .spawn(|| -> io::Result<Vec<Vec<usize>>> {
                        let mut seen = Vec::new();
                        for _ in 0..rounds {
                            for &cpu in cpus {
                                crate::listener::worker::pin_current_thread(cpu)?;
                                let _c = std::net::TcpStream::connect(addr)?;
                                seen.push(accepting(&socks));
                            }
                        }
                        Ok(seen)
                    })
                    .join()
                    .map_err(|_| io::Error::other("the connecting thread panicked"))?
            })
        };
        steer_by_cpu(&socks, Some(cpus))?;
        let seen = connect_from_each(4)?;
        let expected: Vec<Vec<usize>> = (0..4).flat_map(|_| (0..cpus.len()).map(|i| vec![i])).collect();
        assert_eq!(seen, expected, "CPUs {cpus:?}");
        if cpus.len() == 2 {
            steer_by_cpu(&socks, None)?;
            let seen = connect_from_each(16)?;
            assert!(seen != (0..16).flat_map(|_| [vec![0], vec![1]]).collect::<Vec<_>>(), "the hash decides again");
        }
        Ok(())
    }

    #[test]
    fn cpu_steering_needs_one_socket_per_worker() -> io::Result<()> {
        let socks = SystemSockets.bind(&spec("127.0.0.1:0", true), 1)?;
        let err = steer_by_cpu(&socks, Some(&[0, 1])).err().map(|e| e.kind());
        assert_eq!(err, Some(io::ErrorKind::InvalidInput));
        Ok(())
    }

    #[test]
    fn reuse_port_binds_one_socket_per_worker_on_one_port() -> io::Result<()> {
        let socks = SystemSockets.bind(&spec("127.0.0.1:0", true), 3)?;
        assert_eq!(socks.len(), 3);
        let port = socks[0].local_addr()?.port();
        assert_ne!(port, 0);
        for s in &socks {
            assert_eq!(s.local_addr()?.port(), port);
        }
        Ok(())
    }

    #[test]
    fn without_reuse_port_one_socket_and_a_second_bind_fails() -> io::Result<()> {
        let socks = SystemSockets.bind(&spec("127.0.0.1:0", false), 4)?;
        assert_eq!(socks.len(), 1);
        let taken = spec(&socks[0].local_addr()?.to_string(), false);
        let err = SystemSockets.bind(&taken, 1).err().map(|e| e.kind());
        assert_eq!(err, Some(io::ErrorKind::AddrInUse));
        Ok(())
    }

    #[test]
    fn freebind_and_transparent_are_set() -> io::Result<()> {
        let mut s = spec("127.0.0.1:0", true);
        s.freebind = true;
        // IP_TRANSPARENT needs CAP_NET_ADMIN; the tests run as root (CI too).
        s.transparent = true;
        let socks = SystemSockets.bind(&s, 1)?;
        let sock = socket2::SockRef::from(&socks[0]);
        assert!(sock.freebind_v4()?);
        assert!(sock.ip_transparent_v4()?);
        Ok(())
    }

    /// Workers rely on this instead of setting TCP_NODELAY on each connection; a listener's own TCP_NODELAY=0 does
    /// not reach its connections, as Envoy sets no-delay on every accepted connection.
    #[test]
    fn accepted_connections_have_no_delay_set() -> io::Result<()> {
        let s = with_option(libc::IPPROTO_TCP, libc::TCP_NODELAY, 0, SocketState::Listening);
        let socks = SystemSockets.bind(&s, 1)?;
        let _client = std::net::TcpStream::connect(socks[0].local_addr()?)?;
        socks[0].set_nonblocking(false)?;
        let (accepted, _) = socks[0].accept()?;
        assert!(accepted.nodelay()?);
        Ok(())
    }

    #[test]
    fn raw_socket_options_are_applied() -> io::Result<()> {
        // SO_RCVBUF at pre-bind; the kernel doubles what it is given.
        let s = with_option(libc::SOL_SOCKET, libc::SO_RCVBUF, 65536, SocketState::Prebind);
        let socks = SystemSockets.bind(&s, 1)?;
        let sock = socket2::SockRef::from(&socks[0]);
        assert_eq!(sock.recv_buffer_size()?, 131072);
        Ok(())
    }
}
