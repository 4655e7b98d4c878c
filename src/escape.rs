//! HTML escaping, one function for every page paloma writes and every `{{value}}` of an
//! html.hbs template: the report pages, the unsubscribe page and the rendered messages.

/// HTML escaping of `{{value}}` in html.hbs: the same characters as Handlebars' own
/// (`< > " & ' \` =`), but copied in runs and allocated once, not pushed char by char.
pub fn escape_html(s: &str) -> String {
    let b = s.as_bytes();
    let special = |c: &u8| matches!(c, b'<' | b'>' | b'"' | b'&' | b'\'' | b'`' | b'=');
    let Some(first) = b.iter().position(special) else {
        return s.to_string();
    };
    let mut out = String::with_capacity(s.len() + 16);
    out.push_str(&s[..first]);
    let mut copied = first;
    for (i, c) in b.iter().enumerate().skip(first) {
        let rep = match c {
            b'<' => "&lt;",
            b'>' => "&gt;",
            b'"' => "&quot;",
            b'&' => "&amp;",
            b'\'' => "&#x27;",
            b'`' => "&#x60;",
            b'=' => "&#x3D;",
            _ => continue,
        };
        out.push_str(&s[copied..i]);
        out.push_str(rep);
        copied = i + 1;
    }
    out.push_str(&s[copied..]);
    out
}
