//! Which rule a destination falls under: `example.com` matches that domain and its
//! subdomains; `.example.com` also matches domains whose MX hosts are under example.com;
//! and the starting points for the large mailbox providers.

/// Starting points for the large mailbox providers: they limit concurrent connections per
/// sending IP and publish no fixed message rate, so these cap sessions and messages per
/// session. A `[[domains]]` rule for the same domain replaces them.
pub(super) const PROVIDERS: &[(&str, usize, u32)] = &[
    ("gmail.com", 20, 100),
    ("googlemail.com", 20, 100),
    (".google.com", 20, 100),
    ("yahoo.com", 10, 20),
    ("ymail.com", 10, 20),
    ("aol.com", 10, 20),
    (".yahoodns.net", 10, 20),
    ("outlook.com", 10, 100),
    ("hotmail.com", 10, 100),
    ("live.com", 10, 100),
    ("msn.com", 10, 100),
    (".protection.outlook.com", 10, 100),
    ("icloud.com", 10, 50),
    ("me.com", 10, 50),
    ("mac.com", 10, 50),
];

/// Whether `name` is `pattern` (a leading dot ignored) or under it.
pub(super) fn under(name: &str, pattern: &str) -> bool {
    let p = pattern.trim_start_matches('.');
    name == p
        || (name.len() > p.len()
            && name.ends_with(p)
            && name.as_bytes()[name.len() - p.len() - 1] == b'.')
}
