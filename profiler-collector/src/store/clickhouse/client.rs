//! A small blocking client for ClickHouse's HTTP interface: the store's
//! location (`clickhouse://…`), statements with settings, `RowBinary`
//! rows both ways, and external data (a table sent with a query).
use std::{
    fmt,
    time::{Duration, Instant},
};

use base64::Engine as _;

/// Where the ClickHouse store is:
/// `clickhouse://[USER[:PASSWORD]@]HOST[:PORT]/DATABASE` (HTTP port, 8123 by
/// default). `PROFILER_CLICKHOUSE_PASSWORD` in the environment overrides the
/// password (better than a command line).
#[derive(Clone, PartialEq, Eq)]
pub struct ClickHouseUrl {
    pub host: String,
    pub port: u16,
    pub database: String,
    pub user: Option<String>,
    pub password: Option<String>,
}

/// The environment variable holding the password.
pub const PASSWORD_ENV: &str = "PROFILER_CLICKHOUSE_PASSWORD";

impl fmt::Debug for ClickHouseUrl {
    // Never prints the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for ClickHouseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("clickhouse://")?;
        if let Some(user) = &self.user {
            write!(f, "{user}@")?;
        }
        write!(f, "{}:{}/{}", self.host, self.port, self.database)
    }
}

impl std::str::FromStr for ClickHouseUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let usage = "use clickhouse://[USER[:PASSWORD]@]HOST[:PORT]/DATABASE";
        let rest = s
            .strip_prefix("clickhouse://")
            .ok_or_else(|| format!("{s:?} is not a ClickHouse location: {usage}"))?;
        let (authority, database) = rest
            .split_once('/')
            .ok_or_else(|| format!("{s:?} names no database: {usage}"))?;
        let (credentials, host_port) = match authority.rsplit_once('@') {
            Some((c, h)) => (Some(c), h),
            None => (None, authority),
        };
        let (user, password) = match credentials {
            None => (None, None),
            Some(c) => match c.split_once(':') {
                Some((u, p)) => (Some(u.to_string()), Some(p.to_string())),
                None => (Some(c.to_string()), None),
            },
        };
        if user.as_deref() == Some("") {
            return Err(format!("{s:?}: empty user name: {usage}"));
        }
        let (host, port) = match host_port.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
                h,
                p.parse::<u16>()
                    .map_err(|_| format!("{s:?}: bad port {p:?}: {usage}"))?,
            ),
            _ => (host_port, 8123),
        };
        if host.is_empty() {
            return Err(format!("{s:?} names no host: {usage}"));
        }
        // Spliced into SQL as an identifier: letters, digits and `_` only.
        if database.is_empty()
            || !database
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
            || database.starts_with(|c: char| c.is_ascii_digit())
        {
            return Err(format!(
                "{s:?}: the database name must be letters, digits and _ (not first a digit): {usage}"
            ));
        }
        Ok(Self {
            host: host.to_string(),
            port,
            database: database.to_string(),
            user,
            password,
        })
    }
}

/// An error talking to ClickHouse.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Not reached, or no answer in time.
    #[error("ClickHouse at {0} unreachable: {1}")]
    Unreachable(String, String),
    /// ClickHouse answered with an error.
    #[error("ClickHouse error (HTTP {status}): {message}")]
    Server { status: u16, message: String },
    /// The answer could not be decoded.
    #[error("unexpected answer from ClickHouse: {0}")]
    Decode(String),
}

/// One ClickHouse server, over HTTP.
pub struct Client {
    agent: ureq::Agent,
    base: String,
    authorization: Option<String>,
    pub url: ClickHouseUrl,
}

/// A table sent with a query (ClickHouse "external data"): the query reads
/// it by `name`, its rows are TSV of the given structure.
pub struct External<'a> {
    pub name: &'a str,
    /// e.g. `id UInt64`
    pub structure: &'a str,
    pub tsv: &'a [u8],
}

impl Client {
    /// A client whose every request gives up after `timeout`.
    pub fn new(url: &ClickHouseUrl, timeout: Duration) -> Self {
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .build();
        let password = std::env::var(PASSWORD_ENV)
            .ok()
            .or_else(|| url.password.clone());
        let authorization = (url.user.is_some() || password.is_some()).then(|| {
            let user = url.user.as_deref().unwrap_or("default");
            let pair = format!("{user}:{}", password.as_deref().unwrap_or(""));
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(pair)
            )
        });
        Self {
            agent: ureq::Agent::new_with_config(config),
            base: format!("http://{}:{}/", url.host, url.port),
            authorization,
            url: url.clone(),
        }
    }

    /// Runs `query`, with `body` appended to it (e.g. the rows of an
    /// `INSERT … FORMAT RowBinary`) and the given settings; returns the
    /// answer's body.
    pub fn execute(
        &self,
        query: &str,
        body: &[u8],
        settings: &[(&str, String)],
    ) -> Result<Vec<u8>, ClientError> {
        self.execute_by(query, body, settings, None)
    }

    /// [`Client::execute`], giving up at `deadline` (if sooner than the
    /// client's timeout).
    pub fn execute_by(
        &self,
        query: &str,
        body: &[u8],
        settings: &[(&str, String)],
        deadline: Option<Instant>,
    ) -> Result<Vec<u8>, ClientError> {
        // A statement without data goes in the body: URLs are short
        // (16 KiB on older servers), bodies are not.
        let (query, body) = if body.is_empty() {
            ("", query.as_bytes())
        } else {
            (query, body)
        };
        let mut request = self.request(query, settings);
        if let Some(deadline) = deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::Unreachable(
                    format!("{}:{}", self.url.host, self.url.port),
                    "no answer before the write's deadline".into(),
                ));
            }
            request = request.config().timeout_global(Some(left)).build();
        }
        self.finish(request.send(body))
    }

    /// Runs `query` with one external table.
    pub fn execute_with(
        &self,
        query: &str,
        external: &External<'_>,
        settings: &[(&str, String)],
    ) -> Result<Vec<u8>, ClientError> {
        let boundary = format!("profiler-{:016x}", random_u64());
        let mut body = Vec::with_capacity(external.tsv.len() + 256);
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{0}\"; filename=\"{0}\"\r\n\
                 Content-Type: application/octet-stream\r\n\r\n",
                external.name
            )
            .as_bytes(),
        );
        body.extend_from_slice(external.tsv);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let request = self
            .request(query, settings)
            .query(format!("{}_structure", external.name), external.structure)
            .query(format!("{}_format", external.name), "TSV")
            .header(
                "Content-Type",
                format!("multipart/form-data; boundary={boundary}"),
            );
        self.finish(request.send(&body[..]))
    }

    fn request(
        &self,
        query: &str,
        settings: &[(&str, String)],
    ) -> ureq::RequestBuilder<ureq::typestate::WithBody> {
        // The answer is sent once the query is done: an error found midway
        // gets an error status, not a 200 with the message appended.
        let mut request = self.agent.post(&self.base).query("wait_end_of_query", "1");
        if !query.is_empty() {
            request = request.query("query", query);
        }
        for (name, value) in settings {
            request = request.query(*name, value);
        }
        if let Some(auth) = &self.authorization {
            request = request.header("Authorization", auth);
        }
        request
    }

    fn finish(
        &self,
        outcome: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Vec<u8>, ClientError> {
        let unreachable = |e: ureq::Error| {
            ClientError::Unreachable(
                format!("{}:{}", self.url.host, self.url.port),
                e.to_string(),
            )
        };
        let mut response = outcome.map_err(unreachable)?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .with_config()
            .limit(1 << 31)
            .read_to_vec()
            .map_err(unreachable)?;
        if status != 200 {
            let message = String::from_utf8_lossy(&body).trim().to_string();
            return Err(ClientError::Server { status, message });
        }
        Ok(body)
    }
}

/// A random 64-bit number (ids of writes, multipart boundaries): std's
/// randomly seeded hasher over a process-wide counter.
pub fn random_u64() -> u64 {
    use std::{
        hash::BuildHasher,
        sync::atomic::{AtomicU64, Ordering},
    };
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    std::hash::RandomState::new().hash_one(COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// A SQL string literal: `'…'` with `\`, `'` and control bytes escaped.
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\x{:02X}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// Appends `RowBinary` values.
#[derive(Default)]
pub struct RowBinary {
    pub buf: Vec<u8>,
}

impl RowBinary {
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn i64(&mut self, v: i64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// A length as ClickHouse's unsigned LEB128.
    pub fn len(&mut self, mut n: usize) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                self.buf.push(byte);
                return;
            }
            self.buf.push(byte | 0x80);
        }
    }
    pub fn str(&mut self, s: &str) {
        self.len(s.len());
        self.buf.extend_from_slice(s.as_bytes());
    }
}

/// Reads `RowBinary` values from an answer.
pub struct Rows<'a> {
    data: &'a [u8],
}

impl<'a> Rows<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], ClientError> {
        if self.data.len() < n {
            return Err(ClientError::Decode("answer ends inside a row".into()));
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Ok(head)
    }
    pub fn u64(&mut self) -> Result<u64, ClientError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    pub fn len(&mut self) -> Result<usize, ClientError> {
        let mut n = 0usize;
        for shift in (0..64).step_by(7) {
            let byte = self.take(1)?[0];
            n |= usize::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(n);
            }
        }
        Err(ClientError::Decode("length too long".into()))
    }
    pub fn string(&mut self) -> Result<String, ClientError> {
        let n = self.len()?;
        String::from_utf8(self.take(n)?.to_vec())
            .map_err(|_| ClientError::Decode("a string is not UTF-8".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse_and_hide_the_password() {
        let url: ClickHouseUrl = "clickhouse://writer:s3cret@db.example:9123/profiles"
            .parse()
            .unwrap();
        assert_eq!(
            (url.host.as_str(), url.port, url.database.as_str()),
            ("db.example", 9123, "profiles")
        );
        assert_eq!(url.password.as_deref(), Some("s3cret"));
        assert!(!format!("{url:?} {url}").contains("s3cret"));
        let url: ClickHouseUrl = "clickhouse://127.0.0.1/p_1".parse().unwrap();
        assert_eq!((url.port, url.user), (8123, None));
        for bad in [
            "clickhouse://host",
            "clickhouse://host/",
            "clickhouse://host:x/db",
            "clickhouse:///db",
            "clickhouse://h/db;DROP",
            "http://h/db",
        ] {
            assert!(bad.parse::<ClickHouseUrl>().is_err(), "{bad}");
        }
    }

    #[test]
    fn literals_escape_quotes_backslashes_and_controls() {
        assert_eq!(quote(r"a'b\c"), r"'a\'b\\c'");
        assert_eq!(quote("x\ny\0"), r"'x\x0Ay\x00'");
    }

    #[test]
    fn row_binary_round_trips() {
        let mut w = RowBinary::default();
        w.u64(7);
        w.str(&"é".repeat(100));
        let mut r = Rows::new(&w.buf);
        assert_eq!(r.u64().unwrap(), 7);
        assert_eq!(r.string().unwrap(), "é".repeat(100));
        assert!(r.is_empty());
        assert!(Rows::new(&[1, 2]).u64().is_err());
    }
}
