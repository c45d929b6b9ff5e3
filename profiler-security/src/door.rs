//! The first check of every connection, before TLS and tokens: an optional
//! allow-list of client networks (`--allow-cidr`). A connection from
//! elsewhere is closed at once, and the owner of the port is told (to log
//! and count it).
use std::{net::IpAddr, net::SocketAddr, str::FromStr, time::Duration};

use ipnet::IpNet;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
};

/// Accepted connections waiting for the server (or the TLS handshakes) to
/// take them.
const ADMITTED_QUEUE: usize = 64;

/// Client networks allowed to connect; empty: every client.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowList(Vec<IpNet>);

/// A network that is not `ADDRESS/PREFIX` (or a bare address).
#[derive(Debug, thiserror::Error)]
#[error("{text:?} is not a network: use ADDRESS/PREFIX (e.g. 10.0.0.0/8, fd00::/8) or an address")]
pub struct BadNetwork {
    pub text: String,
}

impl AllowList {
    /// The networks of `--allow-cidr` values; a bare address is that
    /// address alone (/32 or /128).
    pub fn parse<S: AsRef<str>>(values: &[S]) -> Result<Self, BadNetwork> {
        values
            .iter()
            .map(|v| {
                let text = v.as_ref().trim();
                IpNet::from_str(text)
                    .or_else(|_| IpAddr::from_str(text).map(IpNet::from))
                    .map_err(|_| BadNetwork {
                        text: text.to_string(),
                    })
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }

    /// True when any client may connect.
    pub fn allows_all(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether a client at `ip` may connect (an IPv4 client reaching an
    /// IPv6 socket, `::ffff:a.b.c.d`, is matched as IPv4).
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.0.is_empty() || self.0.iter().any(|net| net.contains(&ip))
    }

    /// The networks, as given.
    pub fn networks(&self) -> impl Iterator<Item = &IpNet> {
        self.0.iter()
    }
}

/// Connections that passed the door, with their peers.
pub type Admitted = mpsc::Receiver<(TcpStream, SocketAddr)>;

/// Accepts on `listener` until the receiver is dropped, closing at once
/// every connection from outside `allow`; `on_refuse` is told each refused
/// peer (to log and count it). `what` names the server in logs.
pub fn spawn_door(
    listener: TcpListener,
    allow: AllowList,
    what: &'static str,
    on_refuse: impl Fn(SocketAddr) + Send + Sync + 'static,
) -> Admitted {
    let (admitted, incoming) = mpsc::channel(ADMITTED_QUEUE);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                _ = admitted.closed() => return,
                conn = listener.accept() => match conn {
                    Ok(conn) => conn,
                    Err(e) => {
                        // Out of file descriptors and the like: wait, go on.
                        tracing::warn!("{what}: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            if !allow.allows(peer.ip()) {
                drop(tcp);
                on_refuse(peer);
                continue;
            }
            if admitted.send((tcp, peer)).await.is_err() {
                return;
            }
        }
    });
    incoming
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn networks_and_bare_addresses_are_parsed_and_matched() {
        let allow = AllowList::parse(&["10.0.0.0/8", "192.168.1.7", "fd00::/8"]).unwrap();
        assert!(allow.allows(ip("10.1.2.3")));
        assert!(allow.allows(ip("192.168.1.7")));
        assert!(!allow.allows(ip("192.168.1.8")));
        assert!(allow.allows(ip("fd12::1")));
        assert!(!allow.allows(ip("2001:db8::1")));
        // IPv4 clients of a dual-stack socket.
        assert!(allow.allows(ip("::ffff:10.9.9.9")));
        assert!(!allow.allows(ip("::ffff:11.9.9.9")));
    }

    #[test]
    fn an_empty_list_allows_everyone() {
        let allow = AllowList::parse::<&str>(&[]).unwrap();
        assert!(allow.allows_all());
        assert!(allow.allows(ip("203.0.113.9")));
    }

    #[test]
    fn a_bad_network_is_named() {
        let err = AllowList::parse(&["10.0.0.0/33"]).unwrap_err();
        assert!(err.to_string().contains("\"10.0.0.0/33\""), "{err}");
        assert!(AllowList::parse(&["localhost"]).is_err());
    }

    #[tokio::test]
    async fn refused_peers_are_closed_and_reported() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, mut refused) = mpsc::unbounded_channel();
        let mut admitted = spawn_door(
            listener,
            AllowList::parse(&["10.0.0.0/8"]).unwrap(),
            "test",
            move |peer| {
                let _ = tx.send(peer);
            },
        );
        let _client = TcpStream::connect(addr).await.unwrap();
        let peer = refused.recv().await.unwrap();
        assert_eq!(peer.ip(), ip("127.0.0.1"));
        assert!(admitted.try_recv().is_err());

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut admitted = spawn_door(
            listener,
            AllowList::parse(&["127.0.0.0/8"]).unwrap(),
            "test",
            |_| panic!("refused"),
        );
        let _client = TcpStream::connect(addr).await.unwrap();
        assert!(admitted.recv().await.is_some());
    }
}
