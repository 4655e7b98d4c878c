//! Unsubscribe: `GET /u/{token}` shows a confirmation page (link scanners follow every
//! link, so a GET changes nothing); `POST /u/{token}` — the page's button, or an RFC 8058
//! one-click POST from the mailbox provider — records the opt-out, confirmed by the
//! replicas, before the page says so.

use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

use super::{not_found, Kind, Tracker};
use crate::escape::escape_html;
use crate::queue::events::{Event, EventKind};
use crate::store::replication::{eval, AckError};

/// An unsubscribe that Redis has not confirmed by then gets a "try again" page.
const UNSUBSCRIBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Records a recipient's opt-out: in `optouts` (kept apart from the suppression list, so that
/// removing a bounce or a manual block later cannot undo it), on the suppression list unless
/// the address is already there for another reason, and as one `unsubscribed` event — the
/// first time only, so that a second click or a provider's retried POST is not a second event.
/// KEYS: suppressed hash, events stream, the campaign's stats hash, optouts hash, its
/// per-variant and per-touch counters;
/// ARGV: lowercased address, event JSON, now (unix ms), events max length, the job's variant
/// and touch bucket ("" when none).
const UNSUBSCRIBE: &str = include_str!("../scripts/unsubscribe.lua");

pub(super) async fn unsubscribe_page(
    State(app): State<Tracker>,
    uri: Uri,
    headers: HeaderMap,
    token: Result<Path<String>, PathRejection>,
) -> Response {
    let Some(c) = app.verify(token, Kind::Unsubscribe) else {
        app.count("unsubscribe", "invalid");
        return not_found();
    };
    app.count("unsubscribe", "page");
    let lang = Lang::of(&uri, &headers);
    page(StatusCode::OK, lang, Page::Confirm, &c.to)
}

pub(super) async fn unsubscribe(
    State(app): State<Tracker>,
    uri: Uri,
    headers: HeaderMap,
    token: Result<Path<String>, PathRejection>,
    // Read (and so bounded by the body limit) but not needed: any POST to a valid token
    // unsubscribes, whether the page's button or an RFC 8058 `List-Unsubscribe=One-Click`.
    _body: Bytes,
) -> Response {
    let Some(c) = app.verify(token, Kind::Unsubscribe) else {
        app.count("unsubscribe", "invalid");
        return not_found();
    };
    let lang = Lang::of(&uri, &headers);
    let mut event = Event::new(EventKind::Unsubscribed, &c.id, &c.campaign, &c.to);
    event.variant = (!c.variant.is_empty()).then_some(c.variant.as_str());
    let event = event.to_json();
    let mut redis = app.redis.clone();
    let stats = app.keys.stats(&c.campaign);
    let variants = app.keys.variants(&c.campaign);
    let touches = app.keys.touches(&c.campaign);
    let mut cmd = eval(
        UNSUBSCRIBE,
        &[
            &app.keys.suppressed,
            &app.keys.events,
            &stats,
            &app.keys.optouts,
            &variants,
            &touches,
        ],
    );
    cmd.arg(crate::values::address_key(&c.to))
        .arg(event)
        .arg(crate::queue::now_ms())
        .arg(app.keys.events_max_len)
        .arg(&c.variant)
        .arg(&c.touch);
    let mut p = redis::pipe();
    p.add_command(cmd);
    // Confirmed by the replicas before the page says so (`redis.ack_replicas`).
    let write = app
        .acks
        .write::<(i64,)>(&mut redis, &p, false, "unsubscribe");
    match tokio::time::timeout(UNSUBSCRIBE_TIMEOUT + app.acks.timeout(), write).await {
        Ok(Ok((first,))) => {
            app.count(
                "unsubscribe",
                if first == 1 { "unsubscribed" } else { "repeat" },
            );
            page(StatusCode::OK, lang, Page::Done, &c.to)
        }
        Ok(Err(e)) => {
            if matches!(e, AckError::Redis(_)) {
                app.metrics.redis_errors.inc();
            }
            app.count("unsubscribe", "error");
            tracing::warn!(error = %e, "unsubscribe not written");
            crate::listener::retry_later(page(
                StatusCode::SERVICE_UNAVAILABLE,
                lang,
                Page::Failed,
                &c.to,
            ))
        }
        Err(_) => {
            app.count("unsubscribe", "error");
            tracing::warn!("unsubscribe not written: Redis did not answer in time");
            crate::listener::retry_later(page(
                StatusCode::SERVICE_UNAVAILABLE,
                lang,
                Page::Failed,
                &c.to,
            ))
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lang {
    En,
    Es,
}

impl Lang {
    /// `?lang=es|en` first, then the first language of Accept-Language; English otherwise.
    fn of(uri: &Uri, headers: &HeaderMap) -> Lang {
        let from = |s: &str| {
            let s = s.trim().to_ascii_lowercase();
            if s.starts_with("es") {
                Some(Lang::Es)
            } else if s.starts_with("en") {
                Some(Lang::En)
            } else {
                None
            }
        };
        let query = uri.query().unwrap_or("").split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            (k == "lang").then(|| from(v)).flatten()
        });
        query
            .or_else(|| {
                headers
                    .get(header::ACCEPT_LANGUAGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| (from(v) == Some(Lang::Es)).then_some(Lang::Es))
            })
            .unwrap_or(Lang::En)
    }
}

#[derive(Debug, Clone, Copy)]
enum Page {
    Confirm,
    Done,
    Failed,
}

fn page(status: StatusCode, lang: Lang, which: Page, to: &str) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            // The token in the URL is the recipient's key to this page.
            (header::REFERRER_POLICY, "no-referrer"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'",
            ),
        ],
        page_html(lang, which, to),
    )
        .into_response()
}

fn page_html(lang: Lang, which: Page, to: &str) -> String {
    let to = escape_html(to);
    let (code, title, body) = match (lang, which) {
        (Lang::En, Page::Confirm) => (
            "en",
            "Unsubscribe",
            format!(
                "<p>Stop sending emails to <strong>{to}</strong>?</p>\n\
                 <form method=\"post\"><input type=\"hidden\" name=\"List-Unsubscribe\" value=\"One-Click\">\
                 <button type=\"submit\">Unsubscribe</button></form>"
            ),
        ),
        (Lang::Es, Page::Confirm) => (
            "es",
            "Darse de baja",
            format!(
                "<p>¿Dejamos de enviar correos a <strong>{to}</strong>?</p>\n\
                 <form method=\"post\"><input type=\"hidden\" name=\"List-Unsubscribe\" value=\"One-Click\">\
                 <button type=\"submit\">Darme de baja</button></form>"
            ),
        ),
        (Lang::En, Page::Done) => (
            "en",
            "You are unsubscribed",
            format!("<p><strong>{to}</strong> will get no more emails from this list.</p>"),
        ),
        (Lang::Es, Page::Done) => (
            "es",
            "Te has dado de baja",
            format!("<p><strong>{to}</strong> no recibirá más correos de esta lista.</p>"),
        ),
        (Lang::En, Page::Failed) => (
            "en",
            "Please try again",
            "<p>We could not unsubscribe you just now. Please try again in a minute.</p>".into(),
        ),
        (Lang::Es, Page::Failed) => (
            "es",
            "Inténtalo de nuevo",
            "<p>No hemos podido darte de baja ahora mismo. Inténtalo de nuevo en un minuto.</p>"
                .into(),
        ),
    };
    format!(
        "<!DOCTYPE html>\n<html lang=\"{code}\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <meta name=\"robots\" content=\"noindex\">\n<title>{title}</title>\n\
         <style>body{{font-family:Helvetica,Arial,sans-serif;max-width:32em;margin:3em auto;padding:0 1em;color:#222}}\
         button{{padding:.6em 1.2em;font-size:1em}}</style>\n</head>\n<body>\n<h1>{title}</h1>\n{body}\n</body>\n</html>\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn language_from_query_then_accept_language() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::ACCEPT_LANGUAGE, HeaderValue::from_str(v).unwrap());
            m
        };
        let u = |s: &str| s.parse::<Uri>().unwrap();
        assert_eq!(Lang::of(&u("/u/t"), &HeaderMap::new()), Lang::En);
        assert_eq!(Lang::of(&u("/u/t?lang=es"), &HeaderMap::new()), Lang::Es);
        assert_eq!(
            Lang::of(&u("/u/t"), &h("es-ES,es;q=0.9,en;q=0.5")),
            Lang::Es
        );
        assert_eq!(Lang::of(&u("/u/t"), &h("en-US,es;q=0.5")), Lang::En);
        assert_eq!(Lang::of(&u("/u/t?lang=en"), &h("es")), Lang::En);
        assert_eq!(
            Lang::of(&u("/u/t?x=1&lang=ES"), &HeaderMap::new()),
            Lang::Es
        );
    }

    #[test]
    fn pages_escape_the_address() {
        let html = page_html(Lang::Es, Page::Confirm, "a<b>\"@x.test");
        assert!(html.contains("a&lt;b&gt;&quot;@x.test"), "{html}");
        assert!(html.contains("<html lang=\"es\">") && html.contains("method=\"post\""));
        assert!(page_html(Lang::En, Page::Done, "a@x.test").contains("unsubscribed"));
    }
}
