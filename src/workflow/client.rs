//! Webhook POSTs through reqwest: connections reused per host, proxies from the environment
//! (`HTTPS_PROXY`, `NO_PROXY`), a timeout per request, and no redirects followed (a
//! webhook answered with a redirect has not been delivered; following it could POST the
//! signed event somewhere the operator never configured). `https://` goes through rustls
//! with the webpki roots and ring, the TLS stack lettre already brings.

use std::time::Duration;

/// The client every webhook POST of a daemon shares.
pub fn client(timeout: Duration) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(30))
        .user_agent(concat!("paloma/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// POSTs `body` with `headers` and returns the response status. Errors are readable
/// strings without the URL (its query may carry a token): they end up in logs and dead
/// letters, which record the URL apart.
pub async fn post(
    client: &reqwest::Client,
    url: reqwest::Url,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Result<u16, String> {
    let mut req = client.post(url).body(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.map_err(|e| describe(e.without_url()))?;
    Ok(resp.status().as_u16())
}

/// reqwest's error and its causes in one line ("error sending request: … : connection
/// refused").
fn describe(e: reqwest::Error) -> String {
    let mut s = if e.is_timeout() {
        "no answer in time".to_string()
    } else {
        e.to_string()
    };
    let mut src = std::error::Error::source(&e);
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn posts_to_a_local_server_reads_its_status_and_follows_no_redirect() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let mut requests = Vec::new();
            for answer in [
                &b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n"[..],
                b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:1/\r\nContent-Length: 0\r\n\r\n",
            ] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut got = Vec::new();
                let mut buf = [0u8; 1024];
                while !got.ends_with(b"{\"a\":1}") {
                    let n = s.read(&mut buf).await.unwrap();
                    assert!(n > 0);
                    got.extend_from_slice(&buf[..n]);
                }
                s.write_all(answer).await.unwrap();
                s.write_all(b"").await.unwrap();
                requests.push(String::from_utf8(got).unwrap());
                drop(s);
            }
            requests
        });
        let c = client(Duration::from_secs(5)).unwrap();
        let url =
            crate::values::webhook_url(&format!("http://127.0.0.1:{port}/in?token=t0k")).unwrap();
        let h = [("Content-Type", "application/json")];
        assert_eq!(
            post(&c, url.clone(), &h, b"{\"a\":1}".to_vec())
                .await
                .unwrap(),
            202
        );
        // A redirect is the receiver's answer, not followed.
        let c2 = client(Duration::from_secs(5)).unwrap();
        assert_eq!(
            post(&c2, url, &h, b"{\"a\":1}".to_vec()).await.unwrap(),
            302
        );
        let reqs = server.await.unwrap();
        let req = reqs[0].to_ascii_lowercase();
        assert!(req.starts_with("post /in?token=t0k http/1.1\r\n"), "{req}");
        assert!(req.contains(&format!("\r\nhost: 127.0.0.1:{port}\r\n")));
        assert!(req.contains("\r\ncontent-length: 7\r\n"));
        assert!(req.contains("\r\ncontent-type: application/json\r\n"));

        // Nobody listening (port 1, tcpmux, is never served here): a readable error that
        // does not carry the URL.
        let closed = crate::values::webhook_url("http://127.0.0.1:1/?token=secret-token").unwrap();
        let e = post(&c, closed, &[], Vec::new()).await.unwrap_err();
        assert!(!e.contains("secret-token"), "{e}");
        assert!(e.to_ascii_lowercase().contains("connect"), "{e}");
    }
}
