//! Value types that config parses and the rest of paloma consumes: a leaf module, so that
//! [`crate::config`] depends on nothing above it.
//!
//! - [`names`]: campaign names ([`CampaignId`]) and experiment variant names.
//! - [`net`]: address ranges ([`Networks`]) for scanner networks and mx targets.
//! - [`url`]: Redis URLs that never print their password ([`RedisUrl`]), webhook targets.
//! - [`sendgrid`]: SendGrid's Event Webhook verification key.

pub mod names;
pub mod net;
pub mod sendgrid;
pub mod url;

pub use names::{
    address_key, valid_egress_name, valid_variant_name, CampaignId, NameError, CAMPAIGN_RULE,
};
pub use net::{Networks, RangeError, RangeFileError};
pub use sendgrid::{SendGridKey, SendGridKeyError};
pub use url::{redact, webhook_url, RedisUrl, WebhookUrlError};
