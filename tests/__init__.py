import pytest

# support.py asserts on the API's answers: pytest rewrites its asserts as it
# does a test module's, for the same failure messages.
pytest.register_assert_rewrite("tests.support")
