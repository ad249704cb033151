"""Bilevel methods: one factory per file, each returning an `ih.Bilevel` over one `BilevelState`."""
