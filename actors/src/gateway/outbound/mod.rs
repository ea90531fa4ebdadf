//! REST listener ← router, and SMTP/LMTP delivery.
