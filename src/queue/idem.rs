//! The idempotency record of a job id, `{prefix}idem:{id}`: the one place its encoding is
//! written and read (the Lua scripts that write it take the in-progress prefix from
//! [`Idem::IN_PROGRESS`]).
//!
//! | value | state |
//! |---|---|
//! | `p:{entry}` | in progress under that stream entry |
//! | `s` | waiting in the delayed set (a retry, `send_at`, a shaping delay) |
//! | `d` | ended: a later job with the same id is a duplicate |
//!
//! No record: never seen, or a dead job (which may be fixed and enqueued again).

/// What the idempotency record of a job id says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idem<'a> {
    InProgress(&'a str),
    Scheduled,
    Done,
}

impl<'a> Idem<'a> {
    /// The prefix of an in-progress value, followed by the stream entry id.
    pub const IN_PROGRESS: &'static str = "p:";

    pub fn encode(self, out: &mut String) {
        out.clear();
        match self {
            Idem::InProgress(entry) => {
                out.push_str(Self::IN_PROGRESS);
                out.push_str(entry);
            }
            Idem::Scheduled => out.push('s'),
            Idem::Done => out.push('d'),
        }
    }

    pub fn parse(v: &'a str) -> Option<Idem<'a>> {
        match v {
            "s" => Some(Idem::Scheduled),
            "d" => Some(Idem::Done),
            _ => v.strip_prefix(Self::IN_PROGRESS).map(Idem::InProgress),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_reads_back_as_written() {
        let mut s = String::new();
        for state in [
            Idem::InProgress("1700000000000-3"),
            Idem::Scheduled,
            Idem::Done,
        ] {
            state.encode(&mut s);
            assert_eq!(Idem::parse(&s), Some(state));
        }
        assert_eq!(Idem::parse("x"), None);
    }
}
