"""Operations: what the crisis cell and the IT team say and see of the situation."""
