from tests.test_feed import *  # noqa
import tests.test_feed as tf
