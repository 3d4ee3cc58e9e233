-- Creates (or updates the password of) the LOGIN role Grafana reads PostgreSQL as.
-- `syncd grant-reader` then lets it SELECT the reporting views and nothing else.
--
--   SYNCD_READER_PASSWORD=... psql -v ON_ERROR_STOP=1 -v reader=syncd_reader -f reader-role.sql
--
-- The password comes from the environment (\getenv, psql 15 or later), never from the
-- command line; format() quotes the name as an identifier and the password as a literal.
\getenv reader_password SYNCD_READER_PASSWORD
-- Stops here, before creating anything, when the variable is not set.
SELECT :'reader_password' IS NOT NULL AS password_given \gset
SELECT format('CREATE ROLE %I LOGIN', :'reader')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'reader') \gexec
SELECT format('ALTER ROLE %I WITH LOGIN PASSWORD %L', :'reader', :'reader_password') \gexec
