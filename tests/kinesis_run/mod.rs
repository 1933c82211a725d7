//! Configuration of a `sluice run` reading a test stream into a test schema, for the tests that run
//! the binary against the Kinesis emulator.

#![allow(dead_code)]

use std::collections::BTreeMap;

use crate::common::{TestSchema, Watched, database_url, with_defaults};
use crate::kinesis_common::{TestStream, kinesis_endpoint};

/// A Kinesis configuration writing into `schema`, its leases in the schema too. `extra_kinesis`
/// and `extra_pg` add keys to `[source.kinesis]` and `[sink.postgres]`, replacing the defaults here.
pub fn kinesis_config(
    stream: &TestStream,
    schema: &TestSchema,
    extra_kinesis: &str,
    extra_pg: &str,
) -> String {
    let kinesis = with_defaults(
        extra_kinesis,
        &[("poll_interval_ms", "200"), ("lease_duration_seconds", "6")],
    );
    let pg = with_defaults(extra_pg, &[("batch_rows", "100"), ("linger_ms", "100")]);
    format!(
        r#"
[source]
kind = "kinesis"

[source.kinesis]
stream_name = "{stream}"
endpoint_url = "{endpoint}"
region = "us-east-1"
application = "e2e"
lease_table = "{schema}.kinesis_leases"
{kinesis}

[sink.postgres]
url = "{db}"
table = "{table}"
{pg}

[dead_letter]
table = "{dead}"
"#,
        stream = stream.name,
        endpoint = kinesis_endpoint(),
        schema = schema.name,
        db = database_url(),
        table = schema.table(),
        dead = schema.dead_letters(),
    )
}

/// Live leases per owning process id (owner ids are `host:pid:random`), as the lease table in
/// `schema` shows them by the database's clock.
pub async fn live_leases(schema: &TestSchema) -> BTreeMap<u32, i64> {
    let rows = schema
        .client
        .query(
            &format!(
                "SELECT owner, count(*) FROM {}.kinesis_leases
                 WHERE owner IS NOT NULL AND expires_at > now() GROUP BY owner",
                schema.name
            ),
            &[],
        )
        .await
        .expect("leases");
    rows.iter()
        .map(|r| {
            let owner: String = r.get(0);
            let pid = owner.split(':').nth(1).and_then(|p| p.parse().ok());
            (pid.expect("owner id names its process"), r.get(1))
        })
        .collect()
}

/// The process id of a running `sluice`.
pub fn pid(process: &Watched) -> u32 {
    process.child.id().expect("running")
}
