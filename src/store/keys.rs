//! The Redis schema: every key paloma reads or writes, named here and nowhere else. Lua
//! scripts get every key they touch from these names, in KEYS.
//!
//! Redis is the only state. Every key lives under `{prefix}` (in a cluster, a prefix with a
//! hash tag, `{paloma}:`, keeps them in one slot, as scripts and transactions need):
//!
//! | key | type | what |
//! |---|---|---|
//! | `sends` | stream | jobs (`job`; retries also carry `attempt`, `first_at`) |
//! | `events` | stream | one JSON `event` per entry |
//! | `dead` | stream | `job` as received, `error` |
//! | `scheduled` | sorted set | delayed jobs by due time (ms) |
//! | `idem:{id}` | string | the job id's state, see [`crate::queue::idem`] |
//! | `stats:{campaign}` | hash | counters per outcome |
//! | `campaigns` | set | campaign codes seen |
//! | `suppressed` | hash | lower-cased address → reason |
//! | `optouts` | hash | lower-cased address → when the recipient opted out (unix ms) |
//! | `r:{address}` | hash | recent sends (`s`, for frequency caps), marketing messages per month (`t:YYYYMM`, contact pressure), `last_open`, `last_click` |
//! | `links:{campaign}` | hash | clicks per named link, total and `:unique` |
//! | `uniq:{o,c}:{campaign}`, `uniq:l:{campaign}:{link}` | HyperLogLog | sends that opened / clicked (a link) |
//! | `rate:{rule}:{key}`, `rate-back:{rule}:{key}` | string | a shared rate's GCRA state |
//! | `timers`, `timers:cancelled` | sorted set | workflow not_opened / not_clicked timers |
//! | `mta_sts:{domain}` | string | a recipient domain's MTA-STS policy (JSON: TXT `id`, `expires`, the policy text), expiring after its `max_age` |
//! | `suspended_sites` | sorted set | sites suspended after a throttling reply, shared by the fleet (score: until, ms) |
//! | `slowed_sites` | sorted set | `{site}|{count}|{per ms}`: lowered rates after a throttling reply, shared by the fleet (score: until, ms) |
//! | `backoff:{rule}:{site}` | sorted set | a `[[backoff]]` trigger's window of matching replies (score: ms) |
//! | `suspended_domains` | sorted set | recipient domains an operator suspended, `domain` or `{source}/domain` (score: until, ms) |
//! | `warmup:{source}:{day}` | string | messages of a warming source's UTC day (days since the epoch) claimed by the fleet |
//! | `sent:{source}:{day}` | string | messages sent through a source on that UTC day |
//! | `webhooks` | sorted set | workflow webhooks waiting for their next attempt |
//! | `wfjob:{id}` | string | a sent job kept for follow-ups |
//! | `wf:{rule}:{id}` | string | a fired rule's once-only marker |
//! | `campaign_states` | hash | campaign → `paused` / `cancelled` |
//! | `campaign_states:v` | string | bumped with every change of `campaign_states` (daemons re-read it only then) |
//! | `campaigns:active` | sorted set | campaign → its last outcome (ms): what the guards read |
//! | `campaigns:archive` | hash | archived campaign → its counters and link clicks (JSON) |
//! | `parked:{campaign}` | sorted set | a paused campaign's jobs (score: parked at, ms) |
//! | `held:{campaign}` | sorted set | an experiment's jobs held until the decision (score: held at, ms) |
//! | `admin_bounces` | hash | operator's bounce directives, `domain:{d}` / `campaign:{c}` → until (ms) |
//! | `guard_base:{campaign}` | hash | the counters at the campaign's last resume |
//! | `rp:{token}` | string | the job a return-path token names (id, campaign, to) |
//! | `rpseen:{token}:{kind}` | string | a report about that job already recorded |
//! | `written:{recorder}:{n}` | string | the recorder's batch marker |
//! | `conv:{order id}` | string | a posted conversion's answer (JSON), kept `conversions.id_retention`: a retry is answered with it, never counted again |
//! | `convs:{campaign}` | hash | conversions attributed to the campaign: `count`, `people`, `rev:{CUR}` (minor units), the same per `link:{l}:`, `variant:{v}:`, `kind:{k}:`, `touch:{t}:`; and `cost:{CUR}` |
//! | `uniq:p:{campaign}`, `uniq:p:{campaign}:{variant}` | HyperLogLog | people who converted |
//! | `convx:{campaign}` | hash | a revenue experiment's figures: `job:{id}` (the message's revenue, minor units), `{variant}:lsum` / `:lsq` (sums of ln(1 + revenue) and its square) |

/// Key names, built once.
#[derive(Debug, Clone)]
pub struct Keys {
    pub prefix: String,
    pub sends: String,
    pub events: String,
    pub dead: String,
    pub scheduled: String,
    pub campaigns: String,
    pub suppressed: String,
    /// Recipients' own opt-outs (address → unix ms), kept apart from the suppression list.
    pub optouts: String,
    /// Armed negative-rule timers (score: due ms).
    pub timers: String,
    /// Sites suspended after a throttling reply, for every daemon (score: until, ms).
    pub suspended_sites: String,
    /// Lowered rates and session caps after a throttling reply, for every daemon
    /// (`{site}|{count}|{per ms}` or `{site}|c{sessions}`; score: until, ms).
    pub slowed_sites: String,
    /// Recipient domains suspended by an operator (`paloma domain suspend`), for every
    /// daemon: `domain`, or `{source}/{domain}` for one source (score: until, ms).
    pub suspended_domains: String,
    /// The base of the MTA-STS policy cache: the recipient domain is appended.
    pub mta_sts: String,
    /// Recently cancelled timers (score: until ms), so a late `delivered` does not re-arm them.
    pub timers_cancelled: String,
    /// Webhooks waiting for their next try (score: due ms).
    pub webhooks: String,
    /// Campaign → `paused` | `cancelled` (absent: active).
    pub campaign_states: String,
    /// A counter bumped with every change of `campaign_states`.
    pub campaign_states_version: String,
    /// Campaign → when it last had an outcome (ms).
    pub campaigns_active: String,
    /// Operator's bounce directives: `domain:{d}` / `campaign:{c}` → until (ms).
    pub admin_bounces: String,
    /// Archived campaign → `{"stats": {…}, "links": {…}, "archived_at": ms}`.
    pub campaigns_archive: String,
    /// `XADD … MAXLEN ~` of every event: the hard bound (`[events] hard_max_len`), far
    /// above `max_len`, which the retention task keeps without passing what the workflow
    /// engine has not read.
    pub events_max_len: u64,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.to_string(),
            sends: format!("{prefix}sends"),
            events: format!("{prefix}events"),
            dead: format!("{prefix}dead"),
            scheduled: format!("{prefix}scheduled"),
            campaigns: format!("{prefix}campaigns"),
            suppressed: format!("{prefix}suppressed"),
            optouts: format!("{prefix}optouts"),
            timers: format!("{prefix}timers"),
            suspended_sites: format!("{prefix}suspended_sites"),
            suspended_domains: format!("{prefix}suspended_domains"),
            slowed_sites: format!("{prefix}slowed_sites"),
            mta_sts: format!("{prefix}mta_sts:"),
            timers_cancelled: format!("{prefix}timers:cancelled"),
            webhooks: format!("{prefix}webhooks"),
            campaign_states: format!("{prefix}campaign_states"),
            campaign_states_version: format!("{prefix}campaign_states:v"),
            campaigns_active: format!("{prefix}campaigns:active"),
            admin_bounces: format!("{prefix}admin_bounces"),
            campaigns_archive: format!("{prefix}campaigns:archive"),
            events_max_len: crate::config::EventSettings::default().hard_max_len(),
        }
    }

    /// The same keys, with the configured retention of the events stream.
    pub fn retaining(mut self, events: &crate::config::EventSettings) -> Self {
        self.events_max_len = events.hard_max_len();
        self
    }

    /// The window of replies matching `[[backoff]]` rule `rule` from `site` (its trigger).
    pub fn backoff_window(&self, rule: usize, site: &str) -> String {
        format!("{}backoff:{rule}:{site}", self.prefix)
    }

    fn join(&self, parts: &[&str]) -> String {
        let mut k =
            String::with_capacity(self.prefix.len() + parts.iter().map(|p| p.len()).sum::<usize>());
        k.push_str(&self.prefix);
        for p in parts {
            k.push_str(p);
        }
        k
    }

    pub fn idem(&self, id: &str) -> String {
        self.join(&["idem:", id])
    }

    pub fn stats(&self, campaign: &str) -> String {
        self.join(&["stats:", campaign])
    }

    /// A recipient's hash (recent sends, last open and click), by lower-cased address.
    pub fn recipient(&self, address: &str) -> String {
        self.join(&["r:", address])
    }

    pub fn links(&self, campaign: &str) -> String {
        self.join(&["links:", campaign])
    }

    /// Unique opens (`kind` "o") or clicks ("c") of a campaign.
    pub fn unique(&self, kind: &str, campaign: &str) -> String {
        self.join(&["uniq:", kind, ":", campaign])
    }

    /// Unique clicks of one named link.
    pub fn unique_link(&self, campaign: &str, link: &str) -> String {
        self.join(&["uniq:l:", campaign, ":", link])
    }

    /// The prefix of a shared rate's keys: `(rate:{rule}:, rate-back:{rule}:)`.
    pub fn rate(&self, rule: &str) -> (String, String) {
        (
            self.join(&["rate:", rule, ":"]),
            self.join(&["rate-back:", rule, ":"]),
        )
    }

    /// Where a delivered job's JSON is kept for follow-ups.
    pub fn kept_job(&self, id: &str) -> String {
        self.join(&["wfjob:", id])
    }

    /// The once-only marker of a follow-up whose id is `wf:{rule}:{original id}`.
    pub fn marker(&self, follow_up_id: &str) -> String {
        self.join(&[follow_up_id])
    }

    /// A paused campaign's parked jobs (delayed-set members; score: parked at, ms).
    pub fn parked(&self, campaign: &str) -> String {
        self.join(&["parked:", campaign])
    }

    /// An experiment's campaign jobs held until the decision (as [`Keys::parked`]).
    pub fn held(&self, campaign: &str) -> String {
        self.join(&["held:", campaign])
    }

    /// An experiment's state: `started` (ms), and once decided `winner`, `how`
    /// (auto | fallback | manual), `decided_at` (ms), `result` (the decision's figures, JSON).
    pub fn experiment(&self, campaign: &str) -> String {
        self.join(&["experiment:", campaign])
    }

    /// Counters per variant of a campaign: fields `{variant}:{outcome}` (delivered, bounced,
    /// …, unique_opened, unique_clicked, unsubscribed).
    pub fn variants(&self, campaign: &str) -> String {
        self.join(&["variants:", campaign])
    }

    /// Counters per touch bucket of a campaign (see [`crate::policy::touches`]): fields
    /// `{bucket}:{outcome}`.
    pub fn touches(&self, campaign: &str) -> String {
        self.join(&["touches:", campaign])
    }

    /// Outcomes per recipient domain of a campaign (fields `{domain}:{outcome}`, bounded).
    pub fn domains(&self, campaign: &str) -> String {
        self.join(&["domains:", campaign])
    }

    /// People's opens and clicks of a campaign per hour (fields `{unix hour}:{opened|clicked}`).
    pub fn timeline(&self, campaign: &str) -> String {
        self.join(&["timeline:", campaign])
    }

    /// A campaign's counters at its last resume (guards judge what came since).
    pub fn guard_base(&self, campaign: &str) -> String {
        self.join(&["guard_base:", campaign])
    }

    /// The job a return-path token names (`bounces::TokenJob` JSON).
    pub fn return_path(&self, token_key: &str) -> String {
        self.join(&["rp:", token_key])
    }

    /// The once-only marker of one kind of report about one job.
    pub fn report_seen(&self, token_key: &str, what: &str) -> String {
        self.join(&["rpseen:", token_key, ":", what])
    }

    /// A posted conversion's remembered answer, by its order id.
    pub fn order(&self, id: &str) -> String {
        self.join(&["conv:", id])
    }

    /// A campaign's conversion figures and cost (see the table above).
    pub fn conversions(&self, campaign: &str) -> String {
        self.join(&["convs:", campaign])
    }

    /// A revenue experiment's per-message revenue and log sums.
    pub fn conversion_stats(&self, campaign: &str) -> String {
        self.join(&["convx:", campaign])
    }

    /// The people who converted, of a campaign or of one of its variants.
    pub fn converted_people(&self, campaign: &str, variant: Option<&str>) -> String {
        match variant {
            Some(v) => self.join(&["uniq:p:", campaign, ":", v]),
            None => self.join(&["uniq:p:", campaign]),
        }
    }

    /// The base of one recorder's batch markers.
    /// Messages of source `source`'s warm-up day `day` (days since the epoch) the fleet has
    /// claimed.
    pub fn warmup(&self, source: &str, day: i64) -> String {
        format!("{}warmup:{source}:{day}", self.prefix)
    }

    /// Messages sent through `source` on UTC day `day`.
    pub fn source_sent(&self, source: &str, day: i64) -> String {
        format!("{}sent:{source}:{day}", self.prefix)
    }

    pub fn written(&self, recorder: u64) -> String {
        format!("{}written:{recorder:016x}:", self.prefix)
    }
}
