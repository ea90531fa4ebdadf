//! Command-line tools, run as `koukan <tool>`.

pub mod load;
pub mod receive;
pub mod rest_send;
pub mod secret;
pub mod send;
pub mod sink;
