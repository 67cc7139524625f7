-- Queries run in the TUI's SQL console, oldest first: the history outlives the app (as harlequin keeps it), and a
-- query that failed is kept too, to be mended. The console keeps the newest rows (tui/sql_screen.py: HISTORY_KEPT).
CREATE SEQUENCE sql_history_seq;
CREATE TABLE sql_history (
    id     BIGINT PRIMARY KEY DEFAULT nextval('sql_history_seq'),
    sql    VARCHAR NOT NULL,
    ok     BOOLEAN NOT NULL,
    ran_at TIMESTAMP DEFAULT current_timestamp
);
