//! HTTP client of the Koukan REST API (used by the gateway towards the router and by the
//! router's `rest_output` towards gateways and receivers).
