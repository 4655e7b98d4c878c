//! The campaign report people look at, on the API listener: `GET /campaigns` (every
//! campaign) and `GET /campaigns/{c}` (its funnel, opens and clicks over time, links,
//! variants and the decision, delivery per recipient domain, contact pressure). Server-side
//! HTML with SVG charts ([`charts`]), no JavaScript; readable on a phone.
//!
//! Access: `Authorization: Bearer` with the API token or the read-only `api.report_token`,
//! or, for a browser, the session cookie that `POST /login` sets after the token is typed in
//! a form (an HMAC of the token, HttpOnly, SameSite=Strict, and Secure when the report is
//! served over HTTPS, see [`secure_cookie`]: the token itself is never in a
//! cookie or a URL). A report token opens the pages only, never `/api/v1`. Every page is
//! sent with a Content-Security-Policy that allows no script.

pub mod charts;
mod view;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::rejection::FormRejection;
use axum::extract::{Form, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::queue::Keys;
use crate::store::RedisConn;

const COOKIE: &str = "paloma_report";

/// What the pages read with.
pub struct Pages {
    redis: RedisConn,
    keys: Keys,
    /// The intake's consumer group (its lag is shown).
    group: String,
    /// SHA-256 of each session cookie value that opens the pages (one per accepted token).
    sessions: Vec<[u8; 32]>,
    /// SHA-256 of each token that opens the pages (API token, report token).
    tokens: Vec<[u8; 32]>,
    /// The session cookie's attributes: `Secure` when the report is served over HTTPS.
    attrs: &'static str,
}

/// Whether the session cookie gets `Secure`: `api.secure_cookie` when set, else when
/// `tracking.base_url` is https (the deployment is behind TLS, and a browser must never
/// send the session over plain HTTP).
pub fn secure_cookie(settings: &crate::config::Settings) -> bool {
    settings.api.secure_cookie.unwrap_or_else(|| {
        settings
            .tracking
            .base_url
            .get(..8)
            .is_some_and(|s| s.eq_ignore_ascii_case("https://"))
    })
}

/// The cookie value of a token: an HMAC of it, so the cookie is not the token.
fn session_of(token: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(token.as_bytes()).expect("any key length");
    mac.update(b"paloma report session v1");
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn hash(s: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    Sha256::digest(s).into()
}

/// Whether the hash of `value` is one of `hashes`, comparing every one in constant time.
fn any_equal(hashes: &[[u8; 32]], value: &str) -> bool {
    let h = hash(value.as_bytes());
    hashes.iter().fold(false, |ok, t| {
        ok | aws_lc_rs::constant_time::verify_slices_are_equal(&h, t).is_ok()
    })
}

impl Pages {
    pub fn new(redis: RedisConn, keys: Keys, settings: &crate::config::Settings) -> Pages {
        let mut tokens = vec![settings.api.token.expose().to_string()];
        if let Some(t) = &settings.api.report_token {
            tokens.push(t.expose().to_string());
        }
        Pages {
            redis,
            keys,
            group: settings.redis.group.clone(),
            sessions: tokens
                .iter()
                .map(|t| hash(session_of(t).as_bytes()))
                .collect(),
            tokens: tokens.iter().map(|t| hash(t.as_bytes())).collect(),
            attrs: if secure_cookie(settings) {
                "Path=/; HttpOnly; Secure; SameSite=Strict"
            } else {
                "Path=/; HttpOnly; SameSite=Strict"
            },
        }
    }

    /// Whether `token` opens the pages (constant time, on hashes).
    fn token_ok(&self, token: &str) -> bool {
        any_equal(&self.tokens, token)
    }

    fn session_ok(&self, value: &str) -> bool {
        any_equal(&self.sessions, value)
    }

    fn allowed(&self, headers: &HeaderMap) -> bool {
        if let Some(t) = crate::listener::bearer(headers) {
            return self.token_ok(t);
        }
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .any(|(k, v)| k == COOKIE && self.session_ok(v))
    }
}

/// The report's routes.
pub fn router(pages: Arc<Pages>) -> Router {
    Router::new()
        .route("/campaigns", get(list))
        .route("/campaigns/{campaign}", get(campaign))
        .route("/login", get(login_form).post(login))
        .route("/logout", axum::routing::post(logout))
        .with_state(pages)
}

/// A page with the headers every page has.
fn html(status: StatusCode, body: String) -> Response {
    let mut r = (status, body).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// To the login form, back to `next` after it.
fn to_login(next: &str) -> Response {
    let target = format!("/login?next={}", view::url_escape(next));
    Response::builder()
        .status(StatusCode::SEE_OTHER)
        .header(header::LOCATION, target)
        .body(axum::body::Body::empty())
        .unwrap_or_else(|_| StatusCode::UNAUTHORIZED.into_response())
}

/// Only paths of the report are followed after logging in (no open redirect).
fn safe_next(next: Option<&str>) -> &str {
    match next {
        Some(n)
            if n == "/campaigns"
                || n.strip_prefix("/campaigns/").is_some_and(|c| {
                    // One encoded segment (see view::segment), never `.` or `..`.
                    !c.is_empty()
                        && !c.starts_with('.')
                        && c.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-_.~%".contains(&b))
                }) =>
        {
            n
        }
        _ => "/campaigns",
    }
}

async fn login_form(Query(q): Query<BTreeMap<String, String>>) -> Response {
    let next = safe_next(q.get("next").map(String::as_str));
    html(StatusCode::OK, view::login(next, false))
}

async fn login(
    State(pages): State<Arc<Pages>>,
    form: Result<Form<BTreeMap<String, String>>, FormRejection>,
) -> Response {
    let form = form.map(|Form(f)| f).unwrap_or_default();
    let next = safe_next(form.get("next").map(String::as_str)).to_string();
    let token = form.get("token").map(String::as_str).unwrap_or("");
    if token.is_empty() || !pages.token_ok(token) {
        return html(StatusCode::UNAUTHORIZED, view::login(&next, true));
    }
    let cookie = format!(
        "{COOKIE}={}; {}; Max-Age=43200",
        session_of(token),
        pages.attrs
    );
    Response::builder()
        .status(StatusCode::SEE_OTHER)
        .header(header::LOCATION, next)
        .header(header::SET_COOKIE, cookie)
        .body(axum::body::Body::empty())
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn logout(State(pages): State<Arc<Pages>>) -> Response {
    Response::builder()
        .status(StatusCode::SEE_OTHER)
        .header(header::LOCATION, "/login")
        .header(
            header::SET_COOKIE,
            format!("{COOKIE}=; {}; Max-Age=0", pages.attrs),
        )
        .body(axum::body::Body::empty())
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

fn unavailable(e: redis::RedisError) -> Response {
    tracing::warn!(error = %e, "report page: Redis failed");
    html(
        StatusCode::SERVICE_UNAVAILABLE,
        view::message("Redis is unavailable", "Try again in a moment."),
    )
}

/// Campaigns on one page of the list.
pub const PAGE: usize = 100;

async fn list(
    State(pages): State<Arc<Pages>>,
    Query(q): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if !pages.allowed(&headers) {
        return to_login("/campaigns");
    }
    let mut conn = pages.redis.clone();
    let after = q.get("after").map(String::as_str);
    let rows = async {
        let (o, next) =
            crate::stats::overview_page(&mut conn, &pages.keys, &pages.group, after, PAGE).await?;
        Ok::<_, redis::RedisError>((
            crate::stats::campaign_rows(&mut conn, &pages.keys, o).await?,
            next,
        ))
    }
    .await;
    match rows {
        Ok((rows, next)) => html(StatusCode::OK, view::list(&rows, next.as_deref())),
        Err(e) => unavailable(e),
    }
}

/// Everything the campaign page shows, read in a few round trips.
pub struct Report {
    pub row: crate::stats::CampaignRow,
    /// (unix hour, people's opens, people's clicks).
    pub timeline: Vec<(i64, i64, i64)>,
    /// (domain, delivered, deferred, bounced), the busiest first.
    pub domains: Vec<(String, i64, i64, i64)>,
    pub touches: Vec<crate::stats::TouchRow>,
}

async fn report(
    conn: &mut RedisConn,
    keys: &Keys,
    group: &str,
    c: &str,
) -> redis::RedisResult<Option<Report>> {
    if !crate::stats::known(conn, keys, c).await? {
        return Ok(None);
    }
    let o = crate::stats::overview(conn, keys, group, Some(c)).await?;
    let Some(row) = crate::stats::campaign_rows(conn, keys, o).await?.pop() else {
        return Ok(None);
    };
    let (timeline, domains): (BTreeMap<String, i64>, BTreeMap<String, i64>) = redis::pipe()
        .cmd("HGETALL")
        .arg(keys.timeline(c))
        .cmd("HGETALL")
        .arg(keys.domains(c))
        .query_async(conn)
        .await?;
    let touches = crate::stats::touches(conn, keys, Some(c)).await?;
    Ok(Some(Report {
        row,
        timeline: hours(&timeline),
        domains: per_domain(&domains),
        touches,
    }))
}

/// `{hour}:{opened|clicked}` counters as an hourly series, gaps filled with zeros (at most
/// the last 30 days of hours).
fn hours(t: &BTreeMap<String, i64>) -> Vec<(i64, i64, i64)> {
    let mut by: BTreeMap<i64, (i64, i64)> = BTreeMap::new();
    for (k, v) in t {
        let Some((h, what)) = k.split_once(':') else {
            continue;
        };
        let Ok(h) = h.parse::<i64>() else { continue };
        let e = by.entry(h).or_default();
        match what {
            "opened" => e.0 += v,
            "clicked" => e.1 += v,
            _ => {}
        }
    }
    let (Some(&first), Some(&last)) = (by.keys().next(), by.keys().next_back()) else {
        return Vec::new();
    };
    let first = first.max(last - 24 * 30);
    (first..=last)
        .map(|h| {
            let (o, c) = by.get(&h).copied().unwrap_or_default();
            (h, o, c)
        })
        .collect()
}

/// `{domain}:{outcome}` counters per domain, the busiest 25 first.
fn per_domain(d: &BTreeMap<String, i64>) -> Vec<(String, i64, i64, i64)> {
    let mut by: BTreeMap<&str, (i64, i64, i64)> = BTreeMap::new();
    for (k, v) in d {
        let Some((domain, outcome)) = k.rsplit_once(':') else {
            continue;
        };
        let e = by.entry(domain).or_default();
        match outcome {
            "delivered" => e.0 += v,
            "deferred" => e.1 += v,
            "bounced" | "failed" => e.2 += v,
            _ => {}
        }
    }
    let mut v: Vec<(String, i64, i64, i64)> = by
        .into_iter()
        .map(|(d, (a, b, c))| (d.to_string(), a, b, c))
        .collect();
    v.sort_by(|a, b| {
        (b.1 + b.2 + b.3)
            .cmp(&(a.1 + a.2 + a.3))
            .then(a.0.cmp(&b.0))
    });
    v.truncate(25);
    v
}

async fn campaign(
    State(pages): State<Arc<Pages>>,
    Path(c): Path<String>,
    headers: HeaderMap,
) -> Response {
    // Names kept from before they were narrowed stay readable (their links are encoded).
    if !crate::job::CampaignId::readable(&c) {
        return html(
            StatusCode::BAD_REQUEST,
            view::message("No such campaign", crate::job::CAMPAIGN_RULE),
        );
    }
    if !pages.allowed(&headers) {
        return to_login(&view::campaign_href(&c));
    }
    let mut conn = pages.redis.clone();
    match report(&mut conn, &pages.keys, &pages.group, &c).await {
        Ok(Some(r)) => html(StatusCode::OK, view::campaign(&r)),
        Ok(None) => html(
            StatusCode::NOT_FOUND,
            view::message("No such campaign", "No job of it has been seen."),
        ),
        Err(e) => unavailable(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_fill_gaps_and_domains_sort_by_volume() {
        let t: BTreeMap<String, i64> = [("100:opened", 3), ("102:clicked", 1), ("bad", 9)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        assert_eq!(hours(&t), vec![(100, 3, 0), (101, 0, 0), (102, 0, 1)]);
        let d: BTreeMap<String, i64> = [
            ("a.test:delivered", 2),
            ("b.test:delivered", 5),
            ("b.test:bounced", 1),
            ("(other):deferred", 1),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let v = per_domain(&d);
        assert_eq!(v[0], ("b.test".to_string(), 5, 0, 1));
        assert_eq!(v.len(), 3);
    }

    #[test]
    fn only_report_paths_are_followed_after_login() {
        assert_eq!(safe_next(Some("/campaigns/spring")), "/campaigns/spring");
        assert_eq!(safe_next(Some("https://evil.test/")), "/campaigns");
        assert_eq!(safe_next(Some("//evil.test")), "/campaigns");
        assert_eq!(
            safe_next(Some("/campaigns/a%2Fb%2F..%2Fc")),
            "/campaigns/a%2Fb%2F..%2Fc"
        );
        assert_eq!(safe_next(Some("/campaigns/../x")), "/campaigns");
        assert_eq!(safe_next(Some("/campaigns/a/b")), "/campaigns");
        assert_eq!(safe_next(None), "/campaigns");
        assert_ne!(session_of("a-token-0123456789"), "a-token-0123456789");
    }
}
