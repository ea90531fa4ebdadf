//! Prepared statements diesel would not cache.
//!
//! diesel marks every `UPDATE` (and all literal SQL) as unsafe to cache, so each execution
//! parses and plans its statement again; on SQLite that was a tenth of the router's CPU
//! under load (the writer runs a compare-and-swap UPDATE per write, and `BEGIN`,
//! `SAVEPOINT`, `RELEASE`, `COMMIT` per batch). On PostgreSQL each such statement cost an
//! extra round trip (prepare, then execute) on the writer's single connection. The
//! statements here are fixed text per call site, so caching them by their SQL — which
//! diesel's cache does for any query declared safe — is sound.

use diesel::QueryResult;
use diesel::backend::Backend;
use diesel::pg::{Pg, PgMetadataLookup, PgQueryBuilder, PgTypeMetadata};
use diesel::query_builder::bind_collector::RawBytesBindCollector;
use diesel::query_builder::{CollectedQuery, MoveableBindCollector, QueryBuilder, QueryFragment};
use diesel::sqlite::{Sqlite, SqliteQueryBuilder};

pub(crate) type SqliteBinds =
    <<Sqlite as Backend>::BindCollector<'static> as MoveableBindCollector<Sqlite>>::BindData;

/// `q` as a statement SQLite keeps prepared across executions.
pub(crate) fn sqlite<Q: QueryFragment<Sqlite>>(q: &Q) -> QueryResult<CollectedQuery<SqliteBinds>> {
    let mut sql = SqliteQueryBuilder::new();
    q.to_sql(&mut sql, &Sqlite)?;
    let mut binds = <Sqlite as Backend>::BindCollector::default();
    q.collect_binds(&mut binds, &mut (), &Sqlite)?;
    Ok(CollectedQuery::new(sql.finish(), true, binds.moveable()))
}

/// A statement without parameters (`BEGIN IMMEDIATE`, `SAVEPOINT req`, ...), kept prepared.
pub(crate) fn sqlite_text(sql: &str) -> CollectedQuery<SqliteBinds> {
    let binds = <Sqlite as Backend>::BindCollector::default();
    CollectedQuery::new(sql.to_string(), true, binds.moveable())
}

/// `q` as a statement PostgreSQL keeps prepared on the connection.
pub(crate) fn pg<Q: QueryFragment<Pg>>(
    q: &Q,
) -> QueryResult<CollectedQuery<RawBytesBindCollector<Pg>>> {
    let mut sql = PgQueryBuilder::default();
    q.to_sql(&mut sql, &Pg)?;
    let mut binds = RawBytesBindCollector::<Pg>::new();
    q.collect_binds(&mut binds, &mut BuiltinTypesOnly, &Pg)?;
    Ok(CollectedQuery::new(sql.finish(), true, binds))
}

/// The schema uses built-in types only, whose OIDs diesel knows statically: no lookup
/// ever reaches this. Were one to, OID 0 lets the server infer the type.
struct BuiltinTypesOnly;

impl PgMetadataLookup for BuiltinTypesOnly {
    fn lookup_type(&mut self, _type_name: &str, _schema: Option<&str>) -> PgTypeMetadata {
        PgTypeMetadata::new(0, 0)
    }
}
