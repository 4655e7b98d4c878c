//! One pass over rendered HTML: tracked links, the open pixel, and the plain-text
//! alternative for templates without `text.hbs`.
//!
//! A scanner, not a DOM: it looks only at `<a …>` tags and `</body>`, copies everything
//! else through untouched, and costs one walk over the bytes per message.

use std::borrow::Cow;

use crate::track::token::{Kind, Signer};

/// Who the tracked links belong to.
pub struct LinkOwner<'a> {
    pub id: &'a str,
    pub campaign: &'a str,
    pub to: &'a str,
    /// When the message is rendered (Unix seconds, decimal): carried by open and click
    /// tokens so that hits within seconds of delivery can be told apart.
    pub sent: &'a str,
    /// The job's experiment variant ("" when none), carried by open and click tokens so
    /// that people's opens and clicks are counted for it.
    pub variant: &'a str,
    /// A marketing job's touch bucket ("" when none): its opens and clicks are counted for
    /// it.
    pub touch: &'a str,
    /// A transactional job: its tokens say so (a ninth field, `t`), so that the tracking
    /// server never attributes a conversion to its clicks.
    pub transactional: bool,
}

impl LinkOwner<'_> {
    /// Signs an open or click token for this message into `out`.
    fn sign(&self, signer: &Signer, out: &mut String, kind: Kind, url: &str, name: &str) {
        let base = [self.id, self.campaign, self.to, url, name, self.sent];
        let [a, b, c, d, e, f] = base;
        if self.transactional {
            signer.sign_into(
                out,
                kind,
                &[a, b, c, d, e, f, self.variant, self.touch, "t"],
            );
        } else if self.variant.is_empty() && self.touch.is_empty() {
            signer.sign_into(out, kind, &base);
        } else {
            signer.sign_into(out, kind, &[a, b, c, d, e, f, self.variant, self.touch]);
        }
    }
}

/// Rewrites every `http(s)` link of `<a>` tags in `html` into a tracked link, drops the
/// `data-paloma-*` attributes, and adds the open pixel before `</body>` (or at the end).
pub fn rewrite(html: &str, base_url: &str, signer: &Signer, who: &LinkOwner<'_>, out: &mut String) {
    let mut t = Tracker::new(html, base_url, signer, who, out);
    t.scan(0, html.len());
    t.finish();
}

/// [`rewrite`] and [`to_text`] in one walk over the HTML (templates without `text.hbs`): the
/// tags are found and the anchors' attributes read once for both. Same results as calling
/// the two.
pub fn rewrite_and_text(
    html: &str,
    base_url: &str,
    signer: &Signer,
    who: &LinkOwner<'_>,
    out: &mut String,
) -> String {
    let mut t = Tracker::new(html, base_url, signer, who, out);
    let text = text_pass(html, Some(&mut t));
    t.finish();
    text
}

/// The tracked copy of an HTML body, written as anchors are met: everything between them is
/// copied through in runs.
struct Tracker<'a, 'o> {
    html: &'a str,
    base_url: &'a str,
    signer: &'a Signer,
    who: &'a LinkOwner<'a>,
    out: &'o mut String,
    copied: usize,
    body_close: Option<usize>,
    /// An unterminated tag was met: nothing after it is rewritten.
    stopped: bool,
}

impl<'a, 'o> Tracker<'a, 'o> {
    fn new(
        html: &'a str,
        base_url: &'a str,
        signer: &'a Signer,
        who: &'a LinkOwner<'a>,
        out: &'o mut String,
    ) -> Self {
        out.reserve(html.len() + html.len() / 2 + 256);
        Tracker {
            html,
            base_url,
            signer,
            who,
            out,
            copied: 0,
            body_close: None,
            stopped: false,
        }
    }

    /// The `<a …>` tag at `lt..=end`; its raw `href` when the tag was read.
    fn anchor(&mut self, lt: usize, end: usize) -> Option<Option<&'a str>> {
        if self.stopped || lt < self.copied {
            return None;
        }
        self.out.push_str(&self.html[self.copied..lt]);
        let href = rewrite_anchor(
            &self.html[lt..=end],
            self.base_url,
            self.signer,
            self.who,
            self.out,
        );
        self.copied = end + 1;
        Some(href)
    }

    /// Finds the anchors and `</body>` of `html[from..to]` by itself (the whole body, or what
    /// the text pass skips: comments, `<head>`, `<style>`, `<script>`).
    fn scan(&mut self, from: usize, to: usize) {
        let bytes = self.html.as_bytes();
        let mut i = from;
        while !self.stopped && i < to {
            let Some(off) = memchr(b'<', &bytes[i..to]) else {
                break;
            };
            let lt = i + off;
            let rest = &bytes[lt + 1..];
            if rest.len() >= 2 && rest[0].eq_ignore_ascii_case(&b'a') && is_space(rest[1]) {
                let Some(end) = tag_end(bytes, lt + 2) else {
                    self.stopped = true;
                    break;
                };
                let _ = self.anchor(lt, end);
                i = end + 1;
                continue;
            }
            if rest.len() >= 6 && rest[..6].eq_ignore_ascii_case(b"/body>") {
                self.body_close = Some(lt);
            }
            i = lt + 1;
        }
    }

    /// The rest of the body, with the open pixel before `</body>` (or at the end).
    fn finish(self) {
        let (html, out) = (self.html, self.out);
        let pixel_at = self
            .body_close
            .filter(|&b| b >= self.copied)
            .unwrap_or(html.len());
        out.push_str(&html[self.copied..pixel_at]);
        out.push_str("<img src=\"");
        out.push_str(self.base_url);
        out.push_str("/o/");
        self.who.sign(self.signer, out, Kind::Open, "", "");
        out.push_str("\" width=\"1\" height=\"1\" alt=\"\" style=\"display:none;border:0\">");
        out.push_str(&html[pixel_at..]);
    }
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n' | b'\x0c')
}

fn memchr(needle: u8, hay: &[u8]) -> Option<usize> {
    memchr::memchr(needle, hay)
}

/// Index of the `>` closing the tag that starts before `from`, honouring quoted values.
fn tag_end(b: &[u8], from: usize) -> Option<usize> {
    let mut quote = 0u8;
    for (k, &c) in b.iter().enumerate().skip(from) {
        match (quote, c) {
            (0, b'"') | (0, b'\'') => quote = c,
            (0, b'>') => return Some(k),
            (q, c) if q != 0 && c == q => quote = 0,
            _ => {}
        }
    }
    None
}

struct Attr<'a> {
    name: &'a str,
    /// Raw (still entity-encoded) value and its byte range in the tag.
    value: Option<&'a str>,
    range: (usize, usize),
}

/// The attributes of an `<a …>` tag, in order, without allocating.
struct Attrs<'a> {
    tag: &'a str,
    i: usize,
}

fn attributes(tag: &str) -> Attrs<'_> {
    Attrs { tag, i: 2 } // after "<a"
}

impl<'a> Iterator for Attrs<'a> {
    type Item = Attr<'a>;

    fn next(&mut self) -> Option<Attr<'a>> {
        let tag = self.tag;
        let b = tag.as_bytes();
        // Before the closing '>' (an unterminated tag runs to the end).
        let end = if b.last() == Some(&b'>') {
            b.len() - 1
        } else {
            b.len()
        };
        let mut i = self.i;
        loop {
            while i < end && (is_space(b[i]) || b[i] == b'/') {
                i += 1;
            }
            if i >= end {
                self.i = i;
                return None;
            }
            let start = i;
            while i < end && !is_space(b[i]) && b[i] != b'=' && b[i] != b'>' {
                i += 1;
            }
            let name = &tag[start..i];
            let mut j = i;
            while j < end && is_space(b[j]) {
                j += 1;
            }
            let mut value = None;
            if j < end && b[j] == b'=' {
                j += 1;
                while j < end && is_space(b[j]) {
                    j += 1;
                }
                if j < end && (b[j] == b'"' || b[j] == b'\'') {
                    let q = b[j];
                    let vs = j + 1;
                    let k = b[vs..end]
                        .iter()
                        .position(|&c| c == q)
                        .map_or(end, |p| vs + p);
                    value = Some(&tag[vs..k]);
                    i = (k + 1).min(end);
                } else {
                    let vs = j;
                    let mut k = vs;
                    while k < end && !is_space(b[k]) {
                        k += 1;
                    }
                    value = Some(&tag[vs..k]);
                    i = k;
                }
            } else if name.is_empty() {
                i += 1;
                continue;
            }
            self.i = i;
            return Some(Attr {
                name,
                value,
                range: (start, i),
            });
        }
    }
}

fn is_paloma_attr(name: &str) -> bool {
    name.len() > 11 && name.as_bytes()[..11].eq_ignore_ascii_case(b"data-paloma")
}

/// Writes the tracked copy of one `<a …>` tag and returns its (raw) `href`, reading the
/// attributes once: the ones to replace or drop are noted on the way.
fn rewrite_anchor<'t>(
    tag: &'t str,
    base_url: &str,
    signer: &Signer,
    who: &LinkOwner<'_>,
    out: &mut String,
) -> Option<&'t str> {
    const MAX_EDITS: usize = 8;
    let mut notrack = false;
    let mut link_name = None;
    let mut href = None;
    // Byte ranges of the data-paloma-* attributes and of the (first) href, and whether it
    // is the href.
    let mut edits = [(0usize, 0usize, false); MAX_EDITS];
    let mut n = 0;
    let mut overflow = false;
    for a in attributes(tag) {
        let is_paloma = is_paloma_attr(a.name);
        if is_paloma {
            if a.name.eq_ignore_ascii_case("data-paloma-notrack") {
                notrack = true;
            } else if link_name.is_none() && a.name.eq_ignore_ascii_case("data-paloma-link") {
                link_name = a.value;
            }
        } else if href.is_none() && a.name.eq_ignore_ascii_case("href") {
            href = Some(a.value.unwrap_or_default());
        } else {
            continue;
        }
        if n == MAX_EDITS {
            overflow = true;
        } else {
            edits[n] = (a.range.0, a.range.1, !is_paloma);
            n += 1;
        }
    }
    let target = href.map(decode_entities);
    let trackable = !notrack && target.as_deref().is_some_and(trackable_url);
    if !overflow && !trackable && edits[..n].iter().all(|e| e.2) {
        out.push_str(tag);
        return href;
    }
    let url = target.as_deref().unwrap_or_default().trim();
    let name = link_name.map(decode_entities);
    let name = name.as_deref().unwrap_or_default();
    let mut edit = |pos: &mut usize, (start, end, is_href): (usize, usize, bool)| {
        if is_href && !trackable {
            return;
        }
        // A dropped attribute takes the whitespace before it along.
        let mut cut = start;
        if !is_href {
            while cut > *pos && is_space(tag.as_bytes()[cut - 1]) {
                cut -= 1;
            }
        }
        out.push_str(&tag[*pos..cut]);
        if is_href {
            out.push_str("href=\"");
            out.push_str(base_url);
            out.push_str("/c/");
            who.sign(signer, out, Kind::Click, url, name);
            out.push('"');
        }
        *pos = end;
    };
    let mut pos = 0;
    if overflow {
        // More attributes to touch than noted: read them again.
        let mut seen_href = false;
        for a in attributes(tag) {
            let is_paloma = is_paloma_attr(a.name);
            let is_href = !seen_href && !is_paloma && a.name.eq_ignore_ascii_case("href");
            seen_href |= is_href;
            if is_paloma || is_href {
                edit(&mut pos, (a.range.0, a.range.1, is_href));
            }
        }
    } else {
        for &e in &edits[..n] {
            edit(&mut pos, e);
        }
    }
    out.push_str(&tag[pos..]);
    href
}

/// An `http(s)` URL without control characters.
fn trackable_url(u: &str) -> bool {
    let scheme = u.as_bytes().get(..8).unwrap_or(u.as_bytes());
    (starts_with_ci(scheme, b"http://") || starts_with_ci(scheme, b"https://"))
        && !u.bytes().any(|b| b.is_ascii_control())
        // C1 controls (U+0080..U+009F) are 0xC2 0x80..0x9F in UTF-8.
        && !(u.as_bytes().contains(&0xc2) && u.chars().any(char::is_control))
}

fn starts_with_ci(hay: &[u8], prefix: &[u8]) -> bool {
    hay.len() >= prefix.len() && hay[..prefix.len()].eq_ignore_ascii_case(prefix)
}

/// Decodes the character references that HTML escaping produces (`&amp;`, `&#x3D;`, …).
/// Borrows when there is nothing to decode, which is the common case.
pub fn decode_entities(s: &str) -> Cow<'_, str> {
    if memchr(b'&', s.as_bytes()).is_none() {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        rest = &rest[amp..];
        // Bytes, not a str slice: byte 12 may fall inside a multi-byte character.
        let semi = rest.as_bytes()[..rest.len().min(12)]
            .iter()
            .position(|&c| c == b';');
        let decoded = semi.and_then(|semi| {
            let ent = &rest[1..semi];
            let c = match ent {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                "nbsp" => Some('\u{a0}'),
                "middot" => Some('·'),
                "bull" => Some('•'),
                "hellip" => Some('…'),
                "mdash" => Some('—'),
                "ndash" => Some('–'),
                "lsquo" => Some('‘'),
                "rsquo" => Some('’'),
                "ldquo" => Some('“'),
                "rdquo" => Some('”'),
                "laquo" => Some('«'),
                "raquo" => Some('»'),
                "copy" => Some('©'),
                "reg" => Some('®'),
                "trade" => Some('™'),
                "euro" => Some('€'),
                "times" => Some('×'),
                _ if ent.starts_with("#x") || ent.starts_with("#X") => {
                    u32::from_str_radix(&ent[2..], 16)
                        .ok()
                        .and_then(char::from_u32)
                }
                _ if ent.starts_with('#') => ent[1..].parse().ok().and_then(char::from_u32),
                _ => None,
            };
            c.map(|c| (c, semi))
        });
        match decoded {
            Some((c, semi)) => {
                out.push(c);
                rest = &rest[semi + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// Position of `needle` (ASCII, lower case) in `hay`, ignoring ASCII case.
fn find_ci(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len())
        .position(|w| w.eq_ignore_ascii_case(needle))
}

/// A readable plain-text version of an HTML body: block elements become line breaks, links
/// keep their URL in parentheses, `<head>`, `<style>` and `<script>` are dropped.
pub fn to_text(html: &str) -> String {
    text_pass(html, None)
}

fn text_pass(html: &str, mut tracker: Option<&mut Tracker<'_, '_>>) -> String {
    let mut out = String::with_capacity(html.len() / 2);
    let b = html.as_bytes();
    let mut i = 0;
    let mut text_start = 0;
    let mut pending_href: Vec<Option<&str>> = Vec::new();
    let flush = |out: &mut String, s: &str| push_words(out, &decode_entities(s));
    while i < b.len() {
        if b[i] != b'<' {
            i = memchr(b'<', &b[i..]).map_or(b.len(), |p| i + p);
            continue;
        }
        flush(&mut out, &html[text_start..i]);
        if html[i..].starts_with("<!--") {
            let start = i;
            i = html[i..].find("-->").map_or(b.len(), |e| i + e + 3);
            if let Some(t) = tracker.as_deref_mut() {
                t.scan(start, i);
            }
            text_start = i;
            continue;
        }
        let tag_start = i;
        let found_end = tag_end(b, i + 1);
        let end = found_end.unwrap_or(b.len() - 1);
        let tag = &html[i..=end];
        let closing = tag.as_bytes().get(1) == Some(&b'/');
        let name_start = if closing { 2 } else { 1 };
        // The tag name, lower-cased into a small buffer (no allocation per tag).
        let mut name_buf = [0u8; 12];
        let mut len = 0;
        for &c in tag.as_bytes()[name_start..]
            .iter()
            .take_while(|c| c.is_ascii_alphanumeric())
        {
            if len == name_buf.len() {
                len = 0; // longer than any tag we act on
                break;
            }
            name_buf[len] = c.to_ascii_lowercase();
            len += 1;
        }
        let name = &name_buf[..len];
        i = end + 1;
        let is_anchor =
            !closing && name == b"a" && b.get(tag_start + 2).copied().is_some_and(is_space);
        let mut skipped = false;
        match name {
            b"head" | b"style" | b"script" | b"title" if !closing => {
                let mut close = [0u8; 9];
                close[..2].copy_from_slice(b"</");
                close[2..2 + name.len()].copy_from_slice(name);
                i = find_ci(&b[i..], &close[..2 + name.len()]).map_or(b.len(), |p| {
                    let p = i + p;
                    html[p..].find('>').map_or(b.len(), |e| p + e + 1)
                });
                if let Some(t) = tracker.as_deref_mut() {
                    t.scan(tag_start, i);
                }
                skipped = true;
            }
            b"body" if closing => {
                if let Some(t) = tracker.as_deref_mut() {
                    if !t.stopped && starts_with_ci(&b[tag_start + 1..], b"/body>") {
                        t.body_close = Some(tag_start);
                    }
                }
            }
            b"br" => newline(&mut out, 1),
            b"p" | b"div" | b"tr" | b"table" | b"h1" | b"h2" | b"h3" | b"h4" | b"h5" | b"h6"
            | b"ul" | b"ol" | b"hr" | b"section" | b"header" | b"footer" | b"blockquote" => {
                newline(&mut out, 2)
            }
            b"li" if !closing => {
                newline(&mut out, 1);
                out.push_str("- ");
            }
            b"a" if !closing => {
                let mut read = None;
                if let Some(t) = tracker.as_deref_mut() {
                    if is_anchor {
                        match found_end {
                            Some(end) => read = t.anchor(tag_start, end),
                            None => t.stopped = true,
                        }
                    }
                }
                let href = read.unwrap_or_else(|| {
                    attributes(tag)
                        .find(|a| a.name.eq_ignore_ascii_case("href"))
                        .and_then(|a| a.value)
                });
                pending_href.push(href);
            }
            b"a" => {
                if let Some(Some(href)) = pending_href.pop() {
                    let href = decode_entities(href);
                    if (href.starts_with("http") || href.starts_with("mailto:"))
                        && !out.trim_end().ends_with(href.as_ref())
                    {
                        out.push_str(" (");
                        out.push_str(&href);
                        out.push(')');
                    }
                }
            }
            _ => {}
        }
        // What the text reads as one tag may hold an `<a ` the rewriter would meet on its own
        // (`1 < 2 <a href=…>`, `<img alt="<a href=…>">`): look inside it as the rewriter does.
        if let Some(t) = tracker.as_deref_mut() {
            if !is_anchor && !skipped {
                t.scan(tag_start + 1, i);
            }
        }
        text_start = i;
    }
    if text_start < b.len() {
        flush(&mut out, &html[text_start..]);
    }
    let trimmed = out.trim();
    let mut s = String::with_capacity(trimmed.len() + 2);
    s.push_str(trimmed);
    s.push('\n');
    s
}

/// Appends the words of a text run, each after one space (none at the start of a line);
/// runs of ASCII whitespace collapse, a no-break space becomes a plain space inside a word.
fn push_words(out: &mut String, s: &str) {
    if !s.is_ascii() {
        // Unicode spaces (U+2003, U+3000, …) separate words too; a no-break space does not.
        for word in s.split(|c: char| c.is_whitespace() && c != '\u{a0}') {
            push_word(out, word);
        }
        return;
    }
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_whitespace() {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !b[i].is_ascii_whitespace() {
            i += 1;
        }
        push_word(out, &s[start..i]);
    }
}

fn push_word(out: &mut String, word: &str) {
    if word.is_empty() {
        return;
    }
    if !matches!(out.as_bytes().last(), None | Some(b'\n' | b' ')) {
        out.push(' ');
    }
    if word.as_bytes().contains(&0xa0) && word.contains('\u{a0}') {
        out.extend(word.chars().map(|c| if c == '\u{a0}' { ' ' } else { c }));
    } else {
        out.push_str(word);
    }
}

fn newline(out: &mut String, n: usize) {
    while out.ends_with(' ') {
        out.pop();
    }
    if out.is_empty() {
        return;
    }
    let have = out.chars().rev().take_while(|&c| c == '\n').count();
    for _ in have..n {
        out.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn entities_next_to_multibyte_text_and_the_first_link_name() {
        // Byte 12 after '&' falls inside 'ß': once a panic.
        assert_eq!(decode_entities("&amp;M Größe&amp;Co"), "&M Größe&Co");
        assert_eq!(decode_entities("&ñandú;x"), "&ñandú;x");
        let mut out = String::new();
        rewrite(
            "<a href=\"https://x.example/\" data-paloma-link=\"one\" data-paloma-link=\"two\">x</a>",
            "https://t.example",
            &signer(),
            &who(),
            &mut out,
        );
        let token = &out[out.find("/c/").unwrap() + 3..out.find("\">").unwrap()];
        assert_eq!(signer().verify(token).unwrap().link, "one", "{out}");
        assert!(!out.contains("data-paloma"), "{out}");
    }

    #[test]
    fn one_pass_equals_rewrite_then_text() {
        let samples = [
            "<html><head><title>T <a href=\"https://x.example/t\">t</a></title><style>a{}</style></head><body><p>Hi &amp; welcome</p><a href=\"https://a.example/?x=1&amp;y=2\" data-paloma-link=\"one\">One</a> <A\tHREF='http://b.example/'>Two</A><!-- <a href=\"https://c.example/\">hidden</a> --><a data-paloma-notrack href=\"https://d.example/\">Three</a><a href=\"mailto:x@y.example\">mail</a><a>bare</a><ul><li>i1<li>i2</ul></body></html>",
            "no body at all <a href=\"https://x.example/\">x</a> text",
            "<body><p>a</p></body><p>after body</p></BODY >",
            "<p>unterminated <a href=\"https://x.example/\" class=\"q",
            "<script>var s = '<a href=\"https://s.example/\">';</script><a href=\"https://ok.example/\">ok</a>",
            "1 < 2 <a href=\"https://x.example/\">x</a> and <p data-x=it's>q <a href=\"https://y.example/\">y</a></p>",
            "<img alt=\"<a href='https://y.example/'>\"><a>bare</a><abbr title=\"<a href=https://z.example/>\">z</abbr>",
            "<!-- <a title=\"x --><p>hi</p></body>",
            "<p>H&amp;M Größe&amp;Co — ñandú 1&lt;2</p><a href=\"https://x.example/?q=Größe&amp;a=1\" data-paloma-link=\"one\" data-paloma-link=\"two\">G</a>",
            "<p>word\u{3000}word\u{2003}x\u{a0}y</p>",
            "<p>ends in <a x=\"é",
            "<p>ends in <aé",
            "",
        ];
        let s = signer();
        for html in samples {
            let mut a = String::new();
            rewrite(html, "https://t.example", &s, &who(), &mut a);
            let text = to_text(html);
            let mut b = String::new();
            let text2 = rewrite_and_text(html, "https://t.example", &s, &who(), &mut b);
            assert_eq!(a, b, "html of {html:?}");
            assert_eq!(text, text2, "text of {html:?}");
        }
    }

    fn signer() -> Signer {
        Signer::new("1", "test-secret-0123456789", &HashMap::new())
    }

    fn who() -> LinkOwner<'static> {
        LinkOwner {
            id: "j1",
            campaign: "c1",
            to: "a@b.co",
            sent: "1795000000",
            variant: "",
            touch: "",
            transactional: false,
        }
    }

    #[test]
    fn links_are_tracked_except_the_exempt_ones() {
        let html = r##"<html><body><a href="https://shop.example/p?a&#x3D;1&amp;b=2" data-paloma-link="pricing" class="btn">Buy</a>
<A HREF='http://x.example/'>x</A> <a href="mailto:hi@shop.example">mail</a> <a href="tel:+1">tel</a>
<a href="#top">top</a> <a data-paloma-notrack href="https://keep.example/">keep</a></body></html>"##;
        let mut out = String::new();
        let s = signer();
        rewrite(html, "https://t.example", &s, &who(), &mut out);
        assert!(!out.contains("data-paloma"), "{out}");
        assert!(out.contains(r#"href="mailto:hi@shop.example""#));
        assert!(out.contains(r#"href="tel:+1""#));
        assert!(out.contains(r##"href="#top""##));
        assert!(
            out.contains(r#"href="https://keep.example/">keep"#),
            "{out}"
        );
        assert!(out.contains(r#"class="btn">Buy</a>"#), "{out}");
        let tokens: Vec<&str> = out
            .match_indices("https://t.example/c/")
            .map(|(i, _)| {
                let t = &out[i + 20..];
                &t[..t.find('"').unwrap()]
            })
            .collect();
        assert_eq!(tokens.len(), 2, "{out}");
        let c = s.verify(tokens[0]).unwrap();
        assert_eq!(c.url, "https://shop.example/p?a=1&b=2");
        assert_eq!(c.link, "pricing");
        assert_eq!(s.verify(tokens[1]).unwrap().url, "http://x.example/");
        let pixel = out.find("https://t.example/o/").unwrap();
        assert!(pixel < out.find("</body>").unwrap());
    }

    #[test]
    fn pixel_is_appended_without_body() {
        let mut out = String::new();
        rewrite(
            "<p>hi</p>",
            "https://t.example",
            &signer(),
            &who(),
            &mut out,
        );
        assert!(out.starts_with("<p>hi</p><img src=\"https://t.example/o/"));
    }

    #[test]
    fn text_alternative() {
        let html = "<html><head><title>T</title><style>p{color:red}</style></head><body><h1>Hello &amp; welcome</h1><p>Line one<br>line two</p><ul><li>A</li><li>B</li></ul><a href=\"https://x.example/\">Shop</a></body></html>";
        let t = to_text(html);
        assert_eq!(
            t,
            "Hello & welcome\n\nLine one\nline two\n\n- A\n- B\n\nShop (https://x.example/)\n"
        );
    }

    #[test]
    fn entities() {
        assert_eq!(
            decode_entities("a&amp;b&#61;c&#x3D;d&bogus;&"),
            "a&b=c=d&bogus;&"
        );
    }
}
