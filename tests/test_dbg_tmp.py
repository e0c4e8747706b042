from tests.test_feed import *  # noqa
