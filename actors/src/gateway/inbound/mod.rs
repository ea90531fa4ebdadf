//! SMTP listeners → router.
