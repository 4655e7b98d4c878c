//! Settings: one tree, one struct per component, read from TOML and overridden by
//! `PALOMA_SECTION__KEY` environment variables.
//!
//! Durations and rates are written with their unit (`"30s"`, `"10/s"`) and parsed here,
//! once, into typed values; nothing downstream re-parses a string.
//!
//! Files: this one (the tree, loading, the error), [`sections`] (one struct per section
//! with its defaults), [`units`] (durations, rates, percentages), [`secrets`] (the secret
//! type, the weak-secret policy, scrubbing secrets from messages), [`env`] (the environment
//! overlay) and [`validate`] (one check per section, each error naming its key).

mod egress;
mod env;
mod secrets;
mod sections;
mod units;
mod validate;

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use egress::{PoolMember, PoolRule, SourceRule, WarmupRule, IMPLICIT_POOL};
pub use secrets::{weak_secret, Secret, MAKE_SECRET};
pub use sections::*;
pub use units::{Dur, Percent, Rate, Trigger};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Not TOML, or a value not of its key's type (the parser's message names the key).
    #[error("invalid config: {0}")]
    Invalid(String),
    /// A value the checks refuse: `key` names it (`api.token`, `workflows[2]`), `reason`
    /// says what to change.
    #[error("invalid config: {reason}")]
    Key { key: String, reason: String },
}

impl ConfigError {
    /// A refused value of `key`.
    pub fn key(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError::Key {
            key: key.into(),
            reason: reason.into(),
        }
    }

    /// The key the error names, when it is a refused value.
    pub fn key_name(&self) -> Option<&str> {
        match self {
            ConfigError::Key { key, .. } => Some(key),
            _ => None,
        }
    }
}

/// The whole configuration, as `paloma run --config FILE` reads it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[serde(default)]
    pub redis: RedisSettings,
    #[serde(default)]
    pub templates: TemplateSettings,
    pub sender: SenderSettings,
    #[serde(default)]
    pub delivery: DeliverySettings,
    #[serde(default)]
    pub intake: IntakeSettings,
    #[serde(default)]
    pub domains: Vec<DomainRule>,
    /// Replies that suspend a destination (`[[backoff]]`).
    #[serde(default)]
    pub backoff: Vec<BackoffRule>,
    #[serde(default)]
    pub dkim: Vec<DkimSettings>,
    #[serde(default)]
    pub tracking: TrackingSettings,
    #[serde(default)]
    pub metrics: MetricsSettings,
    /// Frequency caps (`[[caps]]`): contact pressure per recipient across campaigns.
    #[serde(default)]
    pub caps: Vec<CapRule>,
    /// Workflow rules (see `[[workflows]]` in config/paloma.toml). Parsed and validated here;
    /// executed by the workflow engine.
    #[serde(default)]
    pub workflows: Vec<WorkflowRule>,
    /// Delivery of workflow webhooks: signing key, retries, timeout.
    #[serde(default)]
    pub webhooks: WebhookSettings,
    /// Retention of `{prefix}events`.
    #[serde(default)]
    pub events: EventSettings,
    /// Retention of finished campaigns' keys (`[campaigns]`).
    #[serde(default)]
    pub campaigns: CampaignSettings,
    /// Conversions posted by the shop: attribution window, limits (`[conversions]`).
    #[serde(default)]
    pub conversions: ConversionSettings,
    /// Late bounces and complaints: VERP return paths and the inbound SMTP listener.
    #[serde(default)]
    pub bounces: BounceSettings,
    /// Bounces and complaints from sending providers' webhooks (on the tracking server).
    #[serde(default)]
    pub providers: ProviderSettings,
    /// Rules that pause a campaign when its bounce or complaint rate goes wrong.
    #[serde(default)]
    pub guards: Vec<GuardRule>,
    /// The HTTP API for campaign systems (off unless `listen` is set).
    #[serde(default)]
    pub api: ApiSettings,
    /// A/B tests of a campaign's template or subject, with a winner picked automatically.
    #[serde(default)]
    pub experiments: Vec<ExperimentRule>,
    /// Egress sources (`[[sources]]`, mx mode): a bound address and EHLO name each.
    #[serde(default)]
    pub sources: Vec<SourceRule>,
    /// Weighted sets of sources (`[[pools]]`).
    #[serde(default)]
    pub pools: Vec<PoolRule>,
}

impl Settings {
    /// Reads `path`, applies `PALOMA_SECTION__KEY` overrides from the process environment,
    /// and validates.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text, std::env::vars())
    }

    /// Parses TOML text with the given environment overrides.
    pub fn from_toml(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut root: toml::Table = toml::from_str(text).map_err(|e| {
            // The parser quotes the offending line, which may be a secret's.
            let msg = e.to_string();
            let secrets: Vec<String> = text
                .lines()
                .filter_map(|l| l.split_once('='))
                .filter(|(k, _)| secrets::is_secret_key(k.trim()))
                .map(|(_, v)| v.trim().trim_matches('"').to_string())
                .collect();
            ConfigError::Invalid(secrets::scrub(msg, &secrets))
        })?;
        env::apply(&mut root, env)?;
        let mut secrets = Vec::new();
        secrets::collect(&toml::Value::Table(root.clone()), false, &mut secrets);
        let settings: Settings =
            toml::Value::Table(root)
                .try_into()
                .map_err(|e: toml::de::Error| {
                    ConfigError::Invalid(secrets::scrub(e.to_string(), &secrets))
                })?;
        settings.validate().map_err(|e| match e {
            ConfigError::Key { key, reason } => ConfigError::Key {
                key,
                reason: secrets::scrub(reason, &secrets),
            },
            other => other,
        })?;
        Ok(settings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const MIN: &str = r#"
[sender]
from = "Shop <news@shop.example>"
helo = "mta.shop.example"
[tracking]
secret = "0123456789abcdef0123"
"#;

    #[test]
    fn a_refused_value_names_its_key() {
        let with = |extra: &str| Settings::from_toml(&format!("{MIN}{extra}"), vec![]);
        let e = with("[api]\nlisten = \"127.0.0.1:8081\"\n").unwrap_err();
        assert_eq!(e.key_name(), Some("api.token"), "{e}");
        let e = with("[[caps]]\nmax = 0\nper = \"1d\"\n").unwrap_err();
        assert_eq!(e.key_name(), Some("caps[0]"), "{e}");
        let e = with("[redis]\nack_timeout = \"9s\"\n").unwrap_err();
        assert_eq!(e.key_name(), Some("redis.ack_timeout"), "{e}");
        // Not TOML: no key to name.
        let e = Settings::from_toml("[sender", vec![]).unwrap_err();
        assert_eq!(e.key_name(), None, "{e}");
    }

    #[test]
    fn durations_and_rates_parse_with_units() {
        assert_eq!("2s".parse::<Dur>().unwrap().0, Duration::from_secs(2));
        assert_eq!("5m".parse::<Dur>().unwrap().0, Duration::from_secs(300));
        assert_eq!("3d".parse::<Dur>().unwrap().0, Duration::from_secs(259200));
        assert_eq!(
            "250ms".parse::<Dur>().unwrap().0,
            Duration::from_millis(250)
        );
        assert!("5".parse::<Dur>().is_err());
        assert!("5y".parse::<Dur>().is_err());
        let r: Rate = "500/min".parse().unwrap();
        assert_eq!((r.count, r.per), (500, Duration::from_secs(60)));
        assert!("0/s".parse::<Rate>().is_err());
        assert!("10".parse::<Rate>().is_err());
    }

    #[test]
    fn env_overrides_file() {
        let env = vec![
            (
                "PALOMA_DELIVERY__RELAY".to_string(),
                "10.0.0.1:25".to_string(),
            ),
            ("PALOMA_INTAKE__BATCH".to_string(), "64".to_string()),
            ("PALOMA_REDIS__PREFIX".to_string(), "x:".to_string()),
            ("HOME".to_string(), "/root".to_string()),
        ];
        let s = Settings::from_toml(MIN, env).unwrap();
        assert_eq!(s.delivery.relay, "10.0.0.1:25");
        assert_eq!(s.intake.batch, 64);
        assert_eq!(s.redis.prefix, "x:");
    }

    #[test]
    fn high_water_is_a_share_and_the_hard_bound_not_below_max_len() {
        let with = |k: &str, v: &str| {
            Settings::from_toml(MIN, vec![(k.to_string(), v.to_string())])
                .map_err(|e| e.to_string())
        };
        let s = with("PALOMA_REDIS__HIGH_WATER", "0.9").unwrap();
        assert_eq!(s.redis.high_water, 0.9);
        assert_eq!(s.events.hard_max_len(), 10_000_000);
        for bad in ["0", "1", "1.5", "-0.2"] {
            let e = with("PALOMA_REDIS__HIGH_WATER", bad).unwrap_err();
            assert!(e.contains("redis.high_water") && e.contains("0.8"), "{e}");
        }
        let e = with("PALOMA_EVENTS__HARD_MAX_LEN", "10").unwrap_err();
        assert!(e.contains("events.hard_max_len"), "{e}");
    }

    #[test]
    fn replicas_and_sentinels_are_checked_and_their_urls_hidden() {
        let with = |extra: &str| {
            let text = format!("{MIN}[redis]\n{extra}\n");
            Settings::from_toml(&text, Vec::<(String, String)>::new()).map_err(|e| e.to_string())
        };
        let s = with("sentinels = [\"redis://:pw-5f0c2e9a7d41@10.0.0.1:26379\"]\nservice_name = \"paloma\"\nack_replicas = 2\nack_timeout = \"250ms\"").unwrap();
        assert_eq!(s.redis.ack_replicas, Some(2));
        assert_eq!(s.redis.ack_timeout.get(), Duration::from_millis(250));
        assert!(!format!("{:?}", s.redis).contains("pw-5f0c2e9a7d41"));
        assert_eq!(with("").unwrap().redis.ack_replicas, None, "found at start");
        let e = with("sentinels = [\"redis://a:26379\"]\ncluster_nodes = [\"redis://b:7000\"]")
            .unwrap_err();
        assert!(
            e.contains("redis.sentinels") && e.contains("cluster_nodes"),
            "{e}"
        );
        let e = with("sentinels = [\"redis://a:26379\"]\nservice_name = \" \"").unwrap_err();
        assert!(e.contains("redis.service_name"), "{e}");
        for bad in ["0s", "6s"] {
            let e = with(&format!("ack_timeout = \"{bad}\"")).unwrap_err();
            assert!(e.contains("redis.ack_timeout"), "{e}");
        }
    }

    #[test]
    fn weak_and_example_secrets_are_refused_with_advice() {
        for weak in [
            "change-me-to-a-long-random-string",
            "CHANGE_ME_PLEASE_1234567",
            "changeme-changeme-changeme",
            "aaaaaaaaaaaaaaaaaaaaaaaa",
            "abababababababababababab",
            "short",
            "secret-secret-secret",
            "password",
            "your-secret-here-0000000",
        ] {
            let text = MIN.replace("0123456789abcdef0123", weak);
            let e = Settings::from_toml(&text, vec![]).unwrap_err().to_string();
            assert!(
                e.contains("tracking.secret") && e.contains("openssl rand"),
                "{weak}: {e}"
            );
            assert!(!e.contains(weak), "the secret is echoed: {e}");
        }
        assert!(weak_secret("9f2c41d07be85a3366e1c0f4d2b7a9e8").is_none());
        assert!(weak_secret("test-secret-0123456789abcdef").is_none());
        let hook = format!("{MIN}\n[webhooks]\nsecret = \"change-me-to-a-long-random-string\"\n");
        let e = Settings::from_toml(&hook, vec![]).unwrap_err().to_string();
        assert!(e.contains("webhooks.secret"), "{e}");
    }

    #[test]
    fn experiments_are_checked_with_what_to_change() {
        let x = |body: &str| {
            let text = format!(
                "{MIN}\n[[experiments]]\ncampaign = \"spring\"\ntest_share = \"20%\"\ndecide_after = \"4h\"\n{body}"
            );
            Settings::from_toml(&text, vec![])
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        let two = "variants = [{ name = \"a\" }, { name = \"b\", subject = \"Hi\" }]\n";
        assert!(x(&format!("{two}fallback = \"a\"")).is_ok());
        let e = x(&format!("{two}fallback = \"z\"")).unwrap_err();
        assert!(
            e.contains("fallback \"z\" is not one of the variants"),
            "{e}"
        );
        let e = x("variants = [{ name = \"a\" }]\nfallback = \"a\"").unwrap_err();
        assert!(e.contains("2 to 8 variants"), "{e}");
        let e = x("variants = [{ name = \"a\" }, { name = \"a\" }]\nfallback = \"a\"").unwrap_err();
        assert!(e.contains("two variants are named"), "{e}");
        let e = x(&format!("{two}fallback = \"a\"\nconfidence = \"100%\"")).unwrap_err();
        assert!(e.contains("confidence"), "{e}");
        let e = x(&format!("{two}fallback = \"a\"\nmetric = \"revenue\"")).unwrap_err();
        assert!(e.contains("revenue") || e.contains("metric"), "{e}");
    }

    #[test]
    fn the_api_needs_a_strong_token_of_its_own() {
        let api = format!("{MIN}\n[api]\nlisten = \"127.0.0.1:0\"\n");
        let e = Settings::from_toml(&api, vec![]).unwrap_err().to_string();
        assert!(
            e.contains("api.token") && e.contains("PALOMA_API__TOKEN"),
            "{e}"
        );
        let weak = format!("{api}token = \"change-me-to-a-long-random-string\"\n");
        let e = Settings::from_toml(&weak, vec![]).unwrap_err().to_string();
        assert!(e.contains("api.token is refused"), "{e}");
        assert!(!e.contains("change-me-to"), "{e}");
        let same = format!("{api}token = \"0123456789abcdef0123\"\n");
        let e = Settings::from_toml(&same, vec![]).unwrap_err().to_string();
        assert!(e.contains("differ"), "{e}");
        let env = vec![(
            "PALOMA_API__TOKEN".to_string(),
            "4f1d9c2be7a05836d1e4".to_string(),
        )];
        let s = Settings::from_toml(&api, env).unwrap();
        assert_eq!(s.api.token.expose(), "4f1d9c2be7a05836d1e4");
        assert!(!format!("{s:?}").contains("4f1d9c2be7a05836d1e4"));
    }

    #[test]
    fn secrets_never_appear_in_errors_or_debug_output() {
        // A numeric password from the environment is a string, not a type error that
        // would print it back.
        let env = vec![
            ("PALOMA_DELIVERY__USERNAME".to_string(), "u".to_string()),
            (
                "PALOMA_DELIVERY__PASSWORD".to_string(),
                "918273645".to_string(),
            ),
            ("PALOMA_DELIVERY__TLS".to_string(), "none".to_string()),
        ];
        let s = Settings::from_toml(MIN, env).unwrap();
        assert_eq!(s.delivery.password.as_ref().unwrap().expose(), "918273645");
        let debug = format!("{s:?}");
        assert!(!debug.contains("918273645"), "{debug}");
        assert!(!debug.contains("0123456789abcdef0123"), "{debug}");
        // A secret of the wrong type in the file, and a bad value next to one.
        let text = format!("{MIN}\n[webhooks]\nsecret = 123456789012345678\n");
        let e = Settings::from_toml(&text, vec![]).unwrap_err().to_string();
        assert!(!e.contains("123456789012345678"), "{e}");
        let text = MIN.replace(
            "[tracking]",
            "[tracking]\nold_secrets = { \"1\" = 99887766554433 }",
        );
        let e = Settings::from_toml(&text, vec![]).unwrap_err().to_string();
        assert!(!e.contains("99887766554433"), "{e}");
        let text = format!("{MIN}\n[redis]\nurl = \"redis://:hunter2-pass@h:6379/\"\nprefix = 7\n");
        let e = Settings::from_toml(&text, vec![]).unwrap_err().to_string();
        assert!(!e.contains("hunter2-pass"), "{e}");
        let s = Settings::from_toml(
            &format!("{MIN}\n[redis]\nurl = \"redis://:hunter2-pass@h:6379/\"\n"),
            vec![],
        )
        .unwrap();
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    #[test]
    fn credentials_need_a_verified_session_or_an_explicit_none() {
        let with = |tls: &str| {
            Settings::from_toml(
                &format!("{MIN}\n[delivery]\nusername = \"u\"\npassword = \"p4ss-word-long\"\ntls = \"{tls}\"\n"),
                vec![],
            )
        };
        let e = with("opportunistic").unwrap_err().to_string();
        assert!(e.contains("delivery.tls") && e.contains("required"), "{e}");
        assert!(with("required").is_ok());
        assert!(with("none").is_ok());
        // The default is opportunistic: a username alone is refused too.
        let e = Settings::from_toml(
            &format!("{MIN}\n[delivery]\nusername = \"u\"\npassword = \"p4ss-word-long\"\n"),
            vec![],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("opportunistic"), "{e}");
    }

    #[test]
    fn unknown_keys_and_missing_secret_are_errors() {
        let e = Settings::from_toml(&format!("{MIN}\n[delivery]\nrelai = \"x\"\n"), vec![])
            .unwrap_err();
        assert!(e.to_string().contains("relai"), "{e}");
        let e = Settings::from_toml("[sender]\nfrom=\"a@b.c\"\nhelo=\"h\"\n", vec![]).unwrap_err();
        assert!(e.to_string().contains("tracking.secret"), "{e}");
    }

    #[test]
    fn a_duration_too_long_for_a_duration_is_an_error_not_a_panic() {
        let e = "99999999999999999999999d".parse::<Dur>().unwrap_err();
        assert!(e.contains("out of range"), "{e}");
    }
}

#[cfg(test)]
mod shipped_config {
    #[test]
    fn the_documented_example_config_parses_once_given_a_real_secret() {
        let text = include_str!("../../config/paloma.toml");
        // Its placeholder secret is refused, with advice on making one.
        let e = super::Settings::from_toml(text, Vec::new())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tracking.secret") && e.contains("openssl rand"),
            "{e}"
        );
        assert!(
            !e.contains("change-me"),
            "the refused value is not echoed: {e}"
        );
        let env = vec![(
            "PALOMA_TRACKING__SECRET".to_string(),
            "9f2c41d07be85a3366e1c0f4d2b7a9e8".to_string(),
        )];
        let s = super::Settings::from_toml(text, env).unwrap();
        assert_eq!(s.redis.prefix, "paloma:");
        assert_eq!(s.delivery.retry_intervals.len(), 6);
    }
}
