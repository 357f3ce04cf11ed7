"""Load: the request generator, open-loop arrivals, the HTTP client, the co-tenant, the cell files."""
