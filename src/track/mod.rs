//! Tracking: signed tokens for links, the open pixel and unsubscribe.

pub mod token;
