def test_probe(database_url, own_pg_cluster):
    print(database_url, own_pg_cluster.url())
