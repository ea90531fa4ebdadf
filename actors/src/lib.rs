//! Koukan's actor systems: the router service (REST transactions as long-running
//! operations, storage, housekeeping) and, beside it, the SMTP gateway.

pub mod logging;
pub mod router;
pub mod signals;
