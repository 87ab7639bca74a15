"""Shared by the examples: scikit-learn's digits (ships inside the package, no download) and a small model."""

import keras
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def digits():
    """(x_train, y_train), (x_test, y_test): 8x8 digit images flattened to 64 floats in [0, 1]."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    return (x_train, y_train), (x_test, y_test)


def get_model():
    model = keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dropout(0.2),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model
