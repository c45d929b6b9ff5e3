//! Loopback ports for servers under test, bound before anyone learns the
//! number, so no other process can take the port in between.
//!
//! - [`listener`]: a bound, listening socket handed to a server that runs in
//!   this process (or inherits it).
//! - [`Reserved`]: a port held by a bound socket that does not listen
//!   (connections are refused, as by a server that is down), for a server in
//!   another process that must come up later on an address its clients
//!   already know; it is released just before that process binds it.
//! - [`serving_addrs`]: the addresses a collector started on port 0 announces
//!   in its log, the way to learn its ports without choosing them first.
use std::{
    net::{SocketAddr, TcpListener},
    os::fd::{FromRawFd, OwnedFd},
};

/// A listening TCP socket on `127.0.0.1`, on a port the kernel chose.
pub fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").expect("bind a loopback port")
}

/// A loopback port held, not listening, until [`release`](Self::release).
#[derive(Debug)]
pub struct Reserved {
    socket: OwnedFd,
    port: u16,
}

impl Reserved {
    /// Binds a socket to `127.0.0.1:0` without listening on it.
    pub fn new() -> Self {
        // SAFETY: plain socket(2)/bind(2)/getsockname(2) on a socket this
        // function owns; the structs are plain data.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
            let socket = OwnedFd::from_raw_fd(fd);
            let mut addr: libc::sockaddr_in = std::mem::zeroed();
            addr.sin_family = libc::AF_INET as libc::sa_family_t;
            addr.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
            let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            let r = libc::bind(fd, (&raw const addr).cast(), len);
            assert!(r == 0, "bind: {}", std::io::Error::last_os_error());
            let mut len = len;
            let r = libc::getsockname(fd, (&raw mut addr).cast(), &mut len);
            assert!(r == 0, "getsockname: {}", std::io::Error::last_os_error());
            Reserved {
                socket,
                port: u16::from_be(addr.sin_port),
            }
        }
    }

    /// The port held.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }

    /// Frees the port for the server about to bind it, and returns it.
    pub fn release(self) -> u16 {
        drop(self.socket);
        self.port
    }
}

impl Default for Reserved {
    fn default() -> Self {
        Self::new()
    }
}

/// The gRPC and HTTP addresses of the collector's `collector serving` log
/// line (`grpc_addr=… http_addr=…`), if `line` is that line.
pub fn serving_addrs(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    if !line.contains("collector serving") {
        return None;
    }
    let field = |name: &str| -> Option<SocketAddr> {
        let rest = &line[line.find(&format!("{name}="))? + name.len() + 1..];
        rest.split(|c: char| c.is_whitespace() || c == ',')
            .next()?
            .trim_matches('"')
            .parse()
            .ok()
    };
    Some((field("grpc_addr")?, field("http_addr")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reserved_port_refuses_connections_until_released_and_bound() {
        let reserved = Reserved::new();
        let addr = reserved.addr();
        assert!(std::net::TcpStream::connect(addr).is_err(), "not listening");
        assert!(TcpListener::bind(addr).is_err(), "held");
        let port = reserved.release();
        let server = TcpListener::bind(("127.0.0.1", port)).expect("free once released");
        assert!(std::net::TcpStream::connect(server.local_addr().unwrap()).is_ok());
    }

    #[test]
    fn a_listener_accepts_at_once() {
        let l = listener();
        assert!(std::net::TcpStream::connect(l.local_addr().unwrap()).is_ok());
    }

    #[test]
    fn reads_the_collectors_addresses() {
        let line = "2026-01-01T00:00:00Z  INFO profiler_collector::server: collector serving \
                    grpc_addr=127.0.0.1:40001 http_addr=127.0.0.1:40002";
        assert_eq!(
            serving_addrs(line),
            Some((
                "127.0.0.1:40001".parse().unwrap(),
                "127.0.0.1:40002".parse().unwrap()
            ))
        );
        assert_eq!(serving_addrs("retention deleted old samples rows=3"), None);
    }
}
