//! Command-line tools, run as `koukan <tool>`.
