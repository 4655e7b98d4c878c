//! Link tracking compiled into `html.hbs` when it is loaded, so that a message costs one
//! signature per link and no scan of the rendered HTML.
//!
//! Each `<a …>` of the template source is rewritten once: its `data-paloma-*` attributes
//! are dropped, a literal `http(s)` href attribute becomes `{{__paloma_link N}}` (N indexes
//! a table of URLs and link names made at load), an href built from data becomes
//! `{{#__paloma_href N}}href="…"{{/__paloma_href}}` (the helper renders the attribute, then
//! decides as the runtime rewriter would: `http(s)` without control characters is tracked,
//! anything else is written as rendered), and `{{__paloma_pixel}}` goes before the last
//! `</body>`.
//!
//! Templates this cannot follow exactly keep the runtime rewriter ([`super::html::rewrite`]):
//! raw output (`{{{…}}}`, `{{&…}}`) and partials could bring anchors of their own, and an
//! anchor whose attribute names, or link name, come from expressions cannot be decided at
//! load. A test renders every case both ways and compares the bytes.
//!
//! The helpers take the message's owner (id, campaign, address, send time) from a
//! thread-local set around the render by the renderer, and note each tracked URL with the
//! original so that the text part derived from the HTML can show the original.

use std::cell::RefCell;
use std::sync::Arc;

use handlebars::{
    Context, Handlebars, Helper, HelperDef, HelperResult, Output, RenderContext, RenderError,
    RenderErrorReason, Renderable, StringOutput,
};

use super::html::{
    attributes, decode_entities, is_paloma_attr, is_space, memchr, tag_end, trackable_url,
};
use crate::track::token::{Kind, Signer};

/// One tracked anchor of a template.
#[derive(Debug, Clone)]
pub struct LinkSpec {
    /// The URL signed into the token (decoded, trimmed); empty when built from data.
    url: String,
    /// The href as written in the template (what the text part shows).
    raw: String,
    /// `data-paloma-link`, decoded.
    name: String,
}

/// Expressions whose output is not escaped, partials and decorators: templates using them
/// keep the runtime rewriter.
const UNFOLLOWABLE: &[&str] = &[
    "{{{", "{{&", "{{>", "{{#>", "{{*", "{{#*", "{{~{", "{{~&", "{{~>", "{{~#>", "{{~*", "{{~#*",
];

/// The tracked version of a template source, adding its links to `table`; None when the
/// template must keep the runtime rewriter.
pub fn compile(src: &str, table: &mut Vec<LinkSpec>) -> Option<String> {
    if UNFOLLOWABLE.iter().any(|p| src.contains(p)) {
        return None;
    }
    let first = table.len();
    let bytes = src.as_bytes();
    let mut out = String::with_capacity(src.len() + 512);
    let mut copied = 0;
    let mut i = 0;
    let mut body_close = None;
    while let Some(off) = memchr(b'<', &bytes[i..]) {
        let lt = i + off;
        let rest = &bytes[lt + 1..];
        if rest.len() >= 2 && rest[0].eq_ignore_ascii_case(&b'a') && is_space(rest[1]) {
            let Some(end) = tag_end(bytes, lt + 2) else {
                table.truncate(first);
                return None;
            };
            out.push_str(&src[copied..lt]);
            if compile_anchor(&src[lt..=end], table, &mut out).is_none() {
                table.truncate(first);
                return None;
            }
            copied = end + 1;
            i = end + 1;
            continue;
        }
        if rest.len() >= 6 && rest[..6].eq_ignore_ascii_case(b"/body>") {
            body_close = Some(lt);
        }
        i = lt + 1;
    }
    let pixel_at = body_close.filter(|&b| b >= copied).unwrap_or(src.len());
    out.push_str(&src[copied..pixel_at]);
    out.push_str("{{__paloma_pixel}}");
    out.push_str(&src[pixel_at..]);
    Some(out)
}

/// The value of a rendered `name=value` attribute, as the tag parser reads it.
fn attr_value(attr: &str) -> &str {
    let Some(eq) = attr.find('=') else {
        return "";
    };
    let v = attr[eq + 1..].trim_start_matches(|c: char| is_space(c as u8) && c.is_ascii());
    match v.as_bytes().first() {
        Some(&q) if q == b'"' || q == b'\'' => {
            let v = &v[1..];
            &v[..v.find(q as char).unwrap_or(v.len())]
        }
        _ => {
            &v[..v
                .find(|c: char| c.is_ascii() && is_space(c as u8))
                .unwrap_or(v.len())]
        }
    }
}

fn has_expr(s: &str) -> bool {
    s.contains("{{") || s.contains("}}")
}

/// Expressions inside a value must open and close within it.
fn balanced(s: &str) -> bool {
    s.matches("{{").count() == s.matches("}}").count()
}

fn compile_anchor(tag: &str, table: &mut Vec<LinkSpec>, out: &mut String) -> Option<()> {
    let mut notrack = false;
    let mut name = None;
    let mut href: Option<(&str, (usize, usize))> = None;
    let mut drops = Vec::new();
    for a in attributes(tag) {
        if has_expr(a.name) || !a.value.is_none_or(balanced) {
            return None;
        }
        if is_paloma_attr(a.name) {
            if a.name.eq_ignore_ascii_case("data-paloma-notrack") {
                notrack = true;
            } else if a.name.eq_ignore_ascii_case("data-paloma-link") {
                let v = a.value.unwrap_or_default();
                if has_expr(v) {
                    return None;
                }
                name = Some(v);
            }
            drops.push(a.range);
        } else if href.is_none() && a.name.eq_ignore_ascii_case("href") {
            href = Some((a.value.unwrap_or_default(), a.range));
        }
    }
    // The href's replacement, if it is tracked.
    let mut replace = None;
    if let (Some((value, range)), false) = (href, notrack) {
        let name = name.map(decode_entities).unwrap_or_default().into_owned();
        if has_expr(value) {
            table.push(LinkSpec {
                url: String::new(),
                raw: String::new(),
                name,
            });
            let n = table.len() - 1;
            // The whole attribute, rendered, is what the helper decides on.
            let attr = &tag[range.0..range.1];
            replace = Some((
                range,
                format!("{{{{#__paloma_href {n}}}}}{attr}{{{{/__paloma_href}}}}"),
            ));
        } else {
            let decoded = decode_entities(value);
            if trackable_url(&decoded) {
                table.push(LinkSpec {
                    url: decoded.trim().to_string(),
                    raw: value.to_string(),
                    name,
                });
                let n = table.len() - 1;
                replace = Some((range, format!("{{{{__paloma_link {n}}}}}")));
            }
        }
    }
    let mut edits: Vec<((usize, usize), Option<String>)> =
        drops.into_iter().map(|r| (r, None)).collect();
    if let Some((r, with)) = replace {
        edits.push((r, Some(with)));
    }
    edits.sort_by_key(|(r, _)| r.0);
    let mut pos = 0;
    for ((start, end), with) in edits {
        let mut cut = start;
        if with.is_none() {
            // A dropped attribute takes the whitespace before it along.
            while cut > pos && is_space(tag.as_bytes()[cut - 1]) {
                cut -= 1;
            }
        }
        out.push_str(&tag[pos..cut]);
        if let Some(w) = with {
            out.push_str(&w);
        }
        pos = end;
    }
    out.push_str(&tag[pos..]);
    Some(())
}

/// Who the message being rendered on this thread is for.
#[derive(Default)]
struct Current {
    active: bool,
    id: String,
    campaign: String,
    to: String,
    sent: String,
    /// Note tracked URLs and their originals (for a text part derived from the HTML).
    record: bool,
    links: Vec<(String, String)>,
}

thread_local! {
    static CURRENT: RefCell<Current> = RefCell::new(Current::default());
}

/// Sets the owner of the links rendered next on this thread (buffers are reused).
pub fn begin(id: &str, campaign: &str, to: &str, sent: &str, record: bool) {
    CURRENT.with_borrow_mut(|c| {
        for (buf, v) in [
            (&mut c.id, id),
            (&mut c.campaign, campaign),
            (&mut c.to, to),
            (&mut c.sent, sent),
        ] {
            buf.clear();
            buf.push_str(v);
        }
        c.active = true;
        c.record = record;
        c.links.clear();
    });
}

/// Ends the render: the tracked URLs written, each with the href it replaced (when asked).
pub fn end() -> Vec<(String, String)> {
    CURRENT.with_borrow_mut(|c| {
        c.active = false;
        std::mem::take(&mut c.links)
    })
}

/// `{{__paloma_link N}}`, `{{#__paloma_href N}}…{{/__paloma_href}}` and `{{__paloma_pixel}}`.
pub struct Helpers {
    table: Arc<Vec<LinkSpec>>,
    signer: Signer,
    base_url: String,
    kind: HelperKind,
}

#[derive(Clone, Copy)]
enum HelperKind {
    Link,
    Href,
    Pixel,
}

/// Registers the tracking helpers on `reg`.
pub fn register(
    reg: &mut Handlebars<'static>,
    table: Arc<Vec<LinkSpec>>,
    signer: &Signer,
    base_url: &str,
) {
    for (name, kind) in [
        ("__paloma_link", HelperKind::Link),
        ("__paloma_href", HelperKind::Href),
        ("__paloma_pixel", HelperKind::Pixel),
    ] {
        reg.register_helper(
            name,
            Box::new(Helpers {
                table: table.clone(),
                signer: signer.clone(),
                base_url: base_url.to_string(),
                kind,
            }),
        );
    }
}

fn other(msg: &str) -> RenderError {
    RenderErrorReason::Other(msg.to_string()).into()
}

impl HelperDef for Helpers {
    fn call<'reg: 'rc, 'rc>(
        &self,
        h: &Helper<'rc>,
        r: &'reg Handlebars<'reg>,
        ctx: &'rc Context,
        rc: &mut RenderContext<'reg, 'rc>,
        out: &mut dyn Output,
    ) -> HelperResult {
        if let HelperKind::Pixel = self.kind {
            let mut buf = String::with_capacity(self.base_url.len() + 256);
            buf.push_str("<img src=\"");
            buf.push_str(&self.base_url);
            buf.push_str("/o/");
            CURRENT.with_borrow(|c| {
                self.signer.sign_into(
                    &mut buf,
                    Kind::Open,
                    &[&c.id, &c.campaign, &c.to, "", "", &c.sent],
                )
            });
            buf.push_str("\" width=\"1\" height=\"1\" alt=\"\" style=\"display:none;border:0\">");
            out.write(&buf)?;
            return Ok(());
        }
        let spec = h
            .param(0)
            .and_then(|p| p.value().as_u64())
            .and_then(|n| self.table.get(n as usize))
            .ok_or_else(|| other("tracked link without its table entry"))?;
        let rendered;
        let decoded;
        let (url, raw) = match self.kind {
            HelperKind::Href => {
                let t = h
                    .template()
                    .ok_or_else(|| other("__paloma_href without a body"))?;
                let mut s = StringOutput::new();
                t.render(r, ctx, rc, &mut s)?;
                rendered = s.into_string().map_err(|_| other("href is not UTF-8"))?;
                let value = attr_value(&rendered);
                decoded = decode_entities(value);
                if !trackable_url(&decoded) {
                    out.write(&rendered)?;
                    return Ok(());
                }
                (decoded.trim(), value)
            }
            _ => (spec.url.as_str(), spec.raw.as_str()),
        };
        CURRENT.with_borrow_mut(|c| {
            let mut buf = String::with_capacity(self.base_url.len() + 256);
            buf.push_str(&self.base_url);
            buf.push_str("/c/");
            self.signer.sign_into(
                &mut buf,
                Kind::Click,
                &[&c.id, &c.campaign, &c.to, url, &spec.name, &c.sent],
            );
            out.write("href=\"")?;
            out.write(&buf)?;
            out.write("\"")?;
            if c.record {
                c.links.push((buf, raw.to_string()));
            }
            Ok(())
        })
    }
}
