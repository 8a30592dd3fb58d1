//! Creating listen sockets on the main thread: SO_REUSEADDR always, SO_REUSEPORT with one socket per worker when
//! `enable_reuse_port`, IPV6_V6ONLY unless `ipv4_compat`, freebind, transparent, the listener's raw socket
//! options at the state they ask for, and the backlog. Workers only convert the result (`from_std`).
//!
//! Socket creation sits behind [`SocketFactory`] so tests can substitute failures. [`steer_by_cpu`] attaches Envoy's
//! `cpu_locality_balance` program to a bound reuse-port group.

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
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Envoy's `cpu_locality_balance`: a classic BPF program on the SO_REUSEPORT group of `sockets` (socket i is worker
/// i's, in the order they were bound) that hands each new connection to the worker pinned to the CPU that received
/// it (`cpus[i]` is worker i's CPU). A CPU without a worker maps by its number modulo the worker count; the kernel
/// falls back to its hash for an index past the group.
pub fn steer_by_cpu(sockets: &[TcpListener], cpus: &[usize]) -> io::Result<()> {
    let invalid = |why: &str| io::Error::new(io::ErrorKind::InvalidInput, why.to_string());
    if sockets.len() != cpus.len() || sockets.is_empty() {
        return Err(invalid("one socket per pinned worker is needed"));
    }
    let n = u32::try_from(cpus.len()).map_err(|_| invalid("too many workers"))?;
    let op = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter { code: code as u16, jt, jf, k };
    // A = the CPU; for each worker: equal to its CPU → return its index, else skip that return; then A mod n.
    let mut prog =
        vec![op(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0, 0, (libc::SKF_AD_OFF + libc::SKF_AD_CPU) as u32)];
    for (i, cpu) in cpus.iter().enumerate() {
        let cpu = u32::try_from(*cpu).map_err(|_| invalid("CPU number out of range"))?;
        prog.push(op(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K, 0, 1, cpu));
        prog.push(op(libc::BPF_RET | libc::BPF_K, 0, 0, i as u32));
    }
    prog.push(op(libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K, 0, 0, n));
    prog.push(op(libc::BPF_RET | libc::BPF_A, 0, 0, 0));
    let len = u16::try_from(prog.len())
        .ok()
        .filter(|l| *l <= libc::BPF_MAXINSNS as u16)
        .ok_or_else(|| invalid("too many workers"))?;
    let fprog = libc::sock_fprog { len, filter: prog.as_mut_ptr() };
    // SAFETY: `fprog` points at `prog`, which outlives the call (the kernel copies the program); the fd is open.
    let rc = unsafe {
        libc::setsockopt(
            sockets[0].as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            std::ptr::from_ref(&fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc != 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
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
            cpu_locality: false,
        }
    }

    /// Which of `socks` has a connection waiting (accepting it).
    fn accepting(socks: &[TcpListener]) -> Vec<usize> {
        socks.iter().enumerate().filter(|(_, s)| s.accept().is_ok()).map(|(i, _)| i).collect()
    }

    /// Envoy's cpu_locality_balance: a connection made from a thread on worker i's CPU (on loopback the SYN is
    /// handled on the connecting CPU) waits on socket i, whichever of the group the kernel's hash would pick.
    #[test]
    fn cpu_steering_queues_each_connection_on_its_cpus_socket() -> io::Result<()> {
        let allowed = crate::listener::worker::allowed_cpus()?;
        let cpus = &allowed[..allowed.len().min(2)];
        let socks = SystemSockets.bind(&spec("127.0.0.1:0", true), cpus.len())?;
        steer_by_cpu(&socks, cpus)?;
        let addr = socks[0].local_addr()?;
        let test_thread = std::thread::spawn({
            let cpus = cpus.to_vec();
            move || -> io::Result<Vec<Vec<usize>>> {
                let mut seen = Vec::new();
                for _ in 0..4 {
                    for &cpu in &cpus {
                        crate::listener::worker::pin_current_thread(cpu)?;
                        let _c = std::net::TcpStream::connect(addr)?;
                        // The handshake is done when connect returns on loopback; give the queue a moment anyway.
                        std::thread::sleep(std::time::Duration::from_millis(5));
                        seen.push(accepting(&socks));
                    }
                }
                Ok(seen)
            }
        });
        let seen = test_thread.join().map_err(|_| io::Error::other("the connecting thread panicked"))??;
        let expected: Vec<Vec<usize>> = (0..4).flat_map(|_| (0..cpus.len()).map(|i| vec![i])).collect();
        assert_eq!(seen, expected, "CPUs {cpus:?}");
        Ok(())
    }

    #[test]
    fn cpu_steering_needs_one_socket_per_worker() -> io::Result<()> {
        let socks = SystemSockets.bind(&spec("127.0.0.1:0", true), 1)?;
        let err = steer_by_cpu(&socks, &[0, 1]).err().map(|e| e.kind());
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

    #[test]
    fn raw_socket_options_are_applied() -> io::Result<()> {
        let mut s = spec("127.0.0.1:0", true);
        // SO_RCVBUF at pre-bind; the kernel doubles what it is given.
        s.socket_options.push(SocketOption {
            level: libc::SOL_SOCKET,
            name: libc::SO_RCVBUF,
            value: SocketOptionValue::Int(65536),
            state: SocketState::Prebind,
        });
        let socks = SystemSockets.bind(&s, 1)?;
        let sock = socket2::SockRef::from(&socks[0]);
        assert_eq!(sock.recv_buffer_size()?, 131072);
        Ok(())
    }
}
