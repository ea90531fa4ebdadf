//! The SMTP gateway: a stateless bridge between SMTP and the router's REST API.
//!
//! * `inbound`: SMTP listeners (MX, submission, implicit TLS); each session drives a router
//!   transaction through the incremental REST dialect.
//! * `outbound`: the REST listener the router delivers to; each transaction becomes an
//!   SMTP/LMTP delivery to the destination's hosts.

pub mod inbound;
pub mod outbound;
