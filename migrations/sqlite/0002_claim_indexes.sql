-- Claims are per channel and oldest-due first; expired leases are found by their own index.
DROP INDEX IF EXISTS deliveries_due;
CREATE INDEX deliveries_claim ON deliveries (channel, status, due_at);
CREATE INDEX deliveries_lease ON deliveries (status, lease_until);
