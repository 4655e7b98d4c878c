//! A minimal HTTP/1.1 client for webhook POSTs: one request per connection
//! (`Connection: close`), a `Content-Length` body, and only the status line of the answer
//! matters. `https://` goes through rustls with the webpki roots (the TLS stack lettre
//! already brings), so a webhook needs no HTTP library.

use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// The largest response head read before giving up on finding the status line.
const MAX_HEAD: usize = 16 * 1024;

/// Where a webhook goes, parsed once from its URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub https: bool,
    /// Host name or IP address (IPv6 without brackets), for connecting and TLS.
    pub host: String,
    pub port: u16,
    /// Path and query, at least `/`.
    pub path: String,
    /// The `Host` header value.
    pub authority: String,
}

impl Target {
    /// `http(s)://host[:port][/path][?query]`; no user info, no fragment, nothing that could
    /// break the request line.
    pub fn parse(url: &str) -> Result<Target, String> {
        let (https, rest) = if let Some(r) = strip_prefix_ci(url, "http://") {
            (false, r)
        } else if let Some(r) = strip_prefix_ci(url, "https://") {
            (true, r)
        } else {
            return Err(format!("{url:?} must start with http:// or https://"));
        };
        if url.bytes().any(|b| !b.is_ascii_graphic()) {
            return Err(format!(
                "{url:?} contains spaces, control or non-ASCII characters (percent-encode them)"
            ));
        }
        if url.contains('#') {
            return Err(format!("{url:?}: a fragment (#…) is never sent; remove it"));
        }
        let split = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(split);
        if authority.contains('@') {
            return Err(format!("{url:?}: user info in the URL is not supported"));
        }
        let default_port = if https { 443 } else { 80 };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("{url:?}: unclosed [ in the host"))?;
            let port = match after {
                "" => default_port,
                p => parse_port(p.strip_prefix(':').unwrap_or("x"), url)?,
            };
            (h.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), parse_port(p, url)?),
                None => (authority.to_string(), default_port),
            }
        };
        if host.is_empty() {
            return Err(format!("{url:?} has no host"));
        }
        let path = if path.starts_with('/') {
            path.to_string()
        } else {
            format!("/{path}")
        };
        Ok(Target {
            https,
            host,
            port,
            path,
            authority: authority.to_string(),
        })
    }
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

fn parse_port(p: &str, url: &str) -> Result<u16, String> {
    p.parse::<u16>()
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("{url:?}: bad port {p:?}"))
}

/// The TLS configuration of webhook connections: webpki roots, ring provider.
pub fn tls_connector() -> Result<TlsConnector, String> {
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS setup: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// POSTs `body` with `headers` (besides Host, Content-Length and Connection) and returns the
/// response status. Errors are readable strings: they end up in dead letters.
pub async fn post(
    target: &Target,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
    tls: &TlsConnector,
) -> Result<u16, String> {
    let mut head = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        target.path,
        target.authority,
        body.len()
    );
    for (k, v) in headers {
        head.push_str(k);
        head.push_str(": ");
        head.push_str(v);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    let exchange = async {
        let tcp = TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(|e| format!("connect {}:{}: {e}", target.host, target.port))?;
        let _ = tcp.set_nodelay(true);
        if target.https {
            let name = ServerName::try_from(target.host.clone())
                .map_err(|e| format!("TLS server name {:?}: {e}", target.host))?;
            let tls = tls
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS handshake with {}: {e}", target.host))?;
            exchange(tls, head.as_bytes(), body).await
        } else {
            exchange(tcp, head.as_bytes(), body).await
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    head: &[u8],
    body: &[u8],
) -> Result<u16, String> {
    s.write_all(head)
        .await
        .and(s.write_all(body).await)
        .and(s.flush().await)
        .map_err(|e| format!("sending the request: {e}"))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        if let Some(status) = final_status(&buf)? {
            return Ok(status);
        }
        if buf.len() >= MAX_HEAD {
            return Err("response head too large".into());
        }
        let n = s
            .read(&mut chunk)
            .await
            .map_err(|e| format!("reading the response: {e}"))?;
        if n == 0 {
            return Err(if buf.is_empty() {
                "connection closed without a response".into()
            } else {
                "connection closed in the middle of the response head".into()
            });
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The status of the first non-1xx response head in `buf`, None while it is incomplete.
fn final_status(buf: &[u8]) -> Result<Option<u16>, String> {
    let mut rest = buf;
    loop {
        let Some(end) = rest.windows(4).position(|w| w == b"\r\n\r\n") else {
            return Ok(None);
        };
        let line_end = rest.windows(2).position(|w| w == b"\r\n").unwrap_or(end);
        let line = String::from_utf8_lossy(&rest[..line_end]);
        let mut parts = line.split(' ');
        let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
            return Err(format!("not an HTTP status line: {line:?}"));
        };
        let status = code
            .parse::<u16>()
            .ok()
            .filter(|c| (100..600).contains(c) && version.starts_with("HTTP/1."))
            .ok_or_else(|| format!("not an HTTP status line: {line:?}"))?;
        if !(100..200).contains(&status) {
            return Ok(Some(status));
        }
        // An interim answer (100 Continue, 103 Early Hints): the real one follows.
        rest = &rest[end + 4..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_into_targets() {
        let t = Target::parse("http://127.0.0.1:8088/hook?x=1").unwrap();
        assert_eq!(
            (
                t.https,
                t.host.as_str(),
                t.port,
                t.path.as_str(),
                t.authority.as_str()
            ),
            (false, "127.0.0.1", 8088, "/hook?x=1", "127.0.0.1:8088")
        );
        let t = Target::parse("HTTPS://crm.example").unwrap();
        assert_eq!((t.https, t.port, t.path.as_str()), (true, 443, "/"));
        let t = Target::parse("http://[::1]:9000?a=b").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("::1", 9000, "/?a=b")
        );
        assert_eq!(t.authority, "[::1]:9000");
        for bad in [
            "ftp://x/",
            "http://",
            "http://:80/",
            "http://a:0/",
            "http://a:99999/",
            "http://user:pw@a/",
            "http://a/b c",
            "http://a/\r\nX-Evil: 1",
            "http://a/#frag",
            "http://[::1/",
            "crm.example/hook",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_final_status_skips_interim_answers() {
        assert_eq!(final_status(b"HTTP/1.1 200 OK\r\n").unwrap(), None);
        assert_eq!(
            final_status(b"HTTP/1.1 204 No Content\r\nA: b\r\n\r\n").unwrap(),
            Some(204)
        );
        assert_eq!(
            final_status(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 503 Busy\r\n\r\n").unwrap(),
            Some(503)
        );
        assert_eq!(
            final_status(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 2").unwrap(),
            None
        );
        assert!(final_status(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        assert!(final_status(b"HTTP/1.1 abc\r\n\r\n").is_err());
    }

    #[tokio::test]
    async fn posts_to_a_local_server_and_reads_its_status() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 1024];
            while !got.ends_with(b"{\"a\":1}") {
                let n = s.read(&mut buf).await.unwrap();
                assert!(n > 0);
                got.extend_from_slice(&buf[..n]);
            }
            s.write_all(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n")
                .await
                .unwrap();
            String::from_utf8(got).unwrap()
        });
        let t = Target::parse(&format!("http://127.0.0.1:{port}/in")).unwrap();
        let tls = tls_connector().unwrap();
        let status = post(
            &t,
            &[("Content-Type", "application/json")],
            b"{\"a\":1}",
            Duration::from_secs(5),
            &tls,
        )
        .await
        .unwrap();
        assert_eq!(status, 202);
        let req = server.await.unwrap();
        assert!(req.starts_with("POST /in HTTP/1.1\r\n"), "{req}");
        assert!(req.contains(&format!("\r\nHost: 127.0.0.1:{port}\r\n")));
        assert!(req.contains("\r\nContent-Length: 7\r\n"));
        assert!(req.contains("\r\nContent-Type: application/json\r\n"));

        // Nobody listening (port 1, tcpmux, is never served here): a readable error.
        let closed = Target::parse("http://127.0.0.1:1/").unwrap();
        let e = post(&closed, &[], b"", Duration::from_secs(5), &tls)
            .await
            .unwrap_err();
        assert!(e.starts_with("connect 127.0.0.1:1"), "{e}");
    }
}
