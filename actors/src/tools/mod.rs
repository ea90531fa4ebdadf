//! Command-line tools, run as `koukan <tool>`.

pub mod sink;
