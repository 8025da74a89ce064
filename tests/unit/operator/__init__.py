"""Unit tests of the operator's plain functions and services, without kopf or a cluster."""
