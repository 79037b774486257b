"""Test harness: a throwaway PostgreSQL and a fault-injecting proxy."""
