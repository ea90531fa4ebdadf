//! `storage.url`: SQLAlchemy-style URLs as written for the reference
//! implementation, mapped to what the Rust database layer accepts.

use std::fmt;
use std::path::PathBuf;

/// Where the router keeps its transactions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageUrl {
    /// SQLite database file; the path `:memory:` is an in-memory database.
    Sqlite { path: PathBuf },
    /// PostgreSQL; `url` is in the form tokio-postgres parses
    /// (`postgresql://user@host/db?...`, Unix sockets via `?host=/dir`).
    Postgres { url: String },
}

pub const SQLITE_MEMORY: &str = ":memory:";

impl StorageUrl {
    /// Parses a storage URL. Accepted forms:
    /// * `sqlite:///rel/path` (SQLAlchemy: three slashes = relative path),
    ///   `sqlite:////abs/path` (four = absolute), `sqlite://path` (plain);
    /// * `sqlite://`, `sqlite::memory:`, `sqlite:///:memory:` (in memory);
    /// * `postgres://…`, `postgresql://…`, and SQLAlchemy's
    ///   `postgresql+<driver>://…` (the driver suffix is dropped).
    ///
    /// Returns the reason on failure (the caller adds the key path).
    pub fn parse(s: &str) -> Result<StorageUrl, String> {
        let s = s.trim();
        if s == "sqlite::memory:" {
            return Ok(Self::memory());
        }
        if let Some(rest) = s.strip_prefix("sqlite://") {
            if rest.contains('?') {
                return Err("query parameters are not supported for sqlite".into());
            }
            // SQLAlchemy puts an empty host before the path: drop one `/`.
            let path = rest.strip_prefix('/').unwrap_or(rest);
            if path.is_empty() || path == SQLITE_MEMORY {
                return Ok(Self::memory());
            }
            return Ok(StorageUrl::Sqlite {
                path: PathBuf::from(path),
            });
        }
        let (scheme, rest) = s
            .split_once("://")
            .ok_or_else(|| format!("not a URL: \"{s}\""))?;
        // SQLAlchemy names the Python driver after `+`; irrelevant here.
        let base = scheme.split('+').next().unwrap_or(scheme);
        match base {
            "postgres" | "postgresql" => {
                // tokio-postgres accepts an empty host (`user@/db`) and then
                // takes the Unix socket directory from `?host=/dir`; adding
                // `localhost` would make it try TCP first, so keep it as is.
                Ok(StorageUrl::Postgres {
                    url: format!("postgresql://{rest}"),
                })
            }
            "sqlite" => Err(format!("unsupported sqlite URL \"{s}\"")),
            _ => Err(format!(
                "unsupported database \"{scheme}\" (expected sqlite or postgresql)"
            )),
        }
    }

    fn memory() -> StorageUrl {
        StorageUrl::Sqlite {
            path: PathBuf::from(SQLITE_MEMORY),
        }
    }

    pub fn is_memory(&self) -> bool {
        matches!(self, StorageUrl::Sqlite { path } if path.as_os_str() == SQLITE_MEMORY)
    }
}

impl fmt::Display for StorageUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StorageUrl::Sqlite { path } => write!(f, "sqlite://{}", path.display()),
            StorageUrl::Postgres { url } => f.write_str(url),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sqlite(p: &str) -> StorageUrl {
        StorageUrl::Sqlite {
            path: PathBuf::from(p),
        }
    }

    fn pg(u: &str) -> StorageUrl {
        StorageUrl::Postgres { url: u.into() }
    }

    #[test]
    fn sqlite_forms() {
        assert_eq!(
            StorageUrl::parse("sqlite:///my_db.sqlite3"),
            Ok(sqlite("my_db.sqlite3"))
        );
        assert_eq!(
            StorageUrl::parse("sqlite:////var/lib/koukan/db.sqlite3"),
            Ok(sqlite("/var/lib/koukan/db.sqlite3"))
        );
        assert_eq!(
            StorageUrl::parse("sqlite://data/k.sqlite3"),
            Ok(sqlite("data/k.sqlite3"))
        );
        assert_eq!(
            StorageUrl::parse("sqlite:///sub/dir/x.db"),
            Ok(sqlite("sub/dir/x.db"))
        );
    }

    #[test]
    fn sqlite_memory() {
        for u in ["sqlite://", "sqlite::memory:", "sqlite:///:memory:"] {
            let parsed = StorageUrl::parse(u).unwrap();
            assert!(parsed.is_memory(), "{u}");
        }
        assert!(!StorageUrl::parse("sqlite:///x.db").unwrap().is_memory());
    }

    #[test]
    fn postgres_forms() {
        assert_eq!(
            StorageUrl::parse("postgres://u:p@db.example:5433/koukan"),
            Ok(pg("postgresql://u:p@db.example:5433/koukan"))
        );
        assert_eq!(
            StorageUrl::parse("postgresql://u@localhost/koukan"),
            Ok(pg("postgresql://u@localhost/koukan"))
        );
        assert_eq!(
            StorageUrl::parse("postgresql+psycopg://user@/db?host=/run/postgresql"),
            Ok(pg("postgresql://user@/db?host=/run/postgresql"))
        );
        assert_eq!(
            StorageUrl::parse(
                "postgresql+psycopg2://my-username@/my-database?host=/var/run/postgresql"
            ),
            Ok(pg(
                "postgresql://my-username@/my-database?host=/var/run/postgresql"
            ))
        );
    }

    #[test]
    fn rejects() {
        assert_eq!(
            StorageUrl::parse("mysql://x/y"),
            Err("unsupported database \"mysql\" (expected sqlite or postgresql)".into())
        );
        assert_eq!(
            StorageUrl::parse("koukan.sqlite3"),
            Err("not a URL: \"koukan.sqlite3\"".into())
        );
        assert_eq!(
            StorageUrl::parse("sqlite:///x.db?mode=ro"),
            Err("query parameters are not supported for sqlite".into())
        );
    }
}
