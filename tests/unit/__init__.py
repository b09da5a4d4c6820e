"""Tests that need no root: pure logic, mocks, fakes (make unit)."""
