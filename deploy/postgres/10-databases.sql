-- One database per write service (its event store, outbox and what it knows of cases), one
-- for the read models and one for the access log (who read which case: kept apart so that
-- a service's credentials cannot rewrite it). Run by the postgres image's entrypoint from
-- /docker-entrypoint-initdb.d, once, when the data volume is empty (a new volume, or
-- `docker compose down -v`); on an existing volume create a missing database by hand.
-- The roles come next (20-roles.sh); the schemas and tables are made by `likvard db
-- migrate` as the owner role (compose's `migrate` service), never by the services.
--
-- The names are the ones docker-compose.yml's LIKVARD_DATABASE_URLs end with:
--   intake, referral, followup: the write services, their relays, consumers and ingest workers
--   projections: the projection worker and the reporting API
--   access_log: the access log (CaseAccessed) every API writes, and its relay
-- Each process connects as its own service's role (20-roles.sh; docs/security.md,
-- "Database roles"); POSTGRES_USER is the administrator only.
CREATE DATABASE intake;
CREATE DATABASE referral;
CREATE DATABASE followup;
CREATE DATABASE projections;
CREATE DATABASE access_log;
