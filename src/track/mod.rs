//! Tracking: signed tokens for links, the open pixel and unsubscribe, and the HTTP server
//! that answers them.

pub mod clickid;
pub mod machine;
pub mod server;
pub mod token;
