"""Built-in word lists for the synthetic tasks (needle keys, record values); fixed so that samples are
reproducible from a seed alone, without faker or a download."""

ADJECTIVES = (
    "ancient", "bitter", "brave", "bright", "calm", "careful", "cheerful", "clever", "cold", "crooked",
    "curious", "damp", "dark", "eager", "early", "empty", "fancy", "fierce", "fluffy", "fragile",
    "gentle", "gifted", "glossy", "golden", "grumpy", "hidden", "hollow", "humble", "icy", "jolly",
    "keen", "late", "lazy", "little", "lively", "lonely", "loud", "lucky", "misty", "modern",
    "narrow", "nervous", "noble", "odd", "old", "pale", "patient", "plain", "polite", "proud",
    "quick", "quiet", "rapid", "rare", "rough", "round", "rusty", "sharp", "shiny", "silent",
    "silly", "sleepy", "slow", "smooth", "soft", "solid", "sour", "spicy", "steady", "sticky",
    "stormy", "strange", "sturdy", "sunny", "swift", "tall", "tame", "tender", "tiny", "tired",
    "vast", "violet", "warm", "wary", "wet", "wide", "wild", "windy", "wise", "witty",
)  # fmt: skip

NOUNS = (
    "anchor", "apple", "arrow", "badger", "bakery", "balloon", "barrel", "beacon", "bicycle", "blanket",
    "bottle", "bridge", "bucket", "button", "cabin", "camel", "candle", "canyon", "carpet", "castle",
    "cherry", "chimney", "clock", "cloud", "comet", "compass", "cookie", "cottage", "crayon", "dagger",
    "desert", "dolphin", "dragon", "drum", "eagle", "engine", "falcon", "feather", "fence", "fiddle",
    "forest", "fountain", "garden", "giraffe", "glacier", "goat", "guitar", "hammer", "harbor", "helmet",
    "island", "jacket", "kettle", "kitten", "ladder", "lantern", "lemon", "lizard", "magnet", "meadow",
    "mirror", "monkey", "needle", "orchard", "otter", "paddle", "parrot", "pebble", "pencil", "pepper",
    "piano", "pillow", "pirate", "planet", "pocket", "puzzle", "rabbit", "ribbon", "river", "rocket",
    "saddle", "sandwich", "scarf", "shovel", "spider", "spoon", "statue", "teapot", "thunder", "tiger",
    "tractor", "trumpet", "tunnel", "turtle", "umbrella", "valley", "violin", "wagon", "walrus", "window",
)  # fmt: skip

FIRST_NAMES = (
    "Ada", "Alan", "Alice", "Amara", "Anton", "Beatrix", "Bruno", "Carla", "Cedric", "Clara",
    "Dario", "Delia", "Edgar", "Elena", "Felix", "Fiona", "Gideon", "Greta", "Hector", "Helena",
    "Ivan", "Iris", "Jonas", "Julia", "Kasper", "Keira", "Lars", "Lena", "Marco", "Maya",
    "Nadia", "Nils", "Oscar", "Olga", "Pablo", "Petra", "Quentin", "Rosa", "Rupert", "Sofia",
    "Tobias", "Tessa", "Ulrich", "Uma", "Victor", "Vera", "Walter", "Wanda", "Xavier", "Yara",
)  # fmt: skip

LAST_NAMES = (
    "Abbott", "Barlow", "Becker", "Brennan", "Castillo", "Dalton", "Delgado", "Eriksen", "Fairbanks",
    "Fischer",
    "Galloway", "Hartley", "Hoffman", "Ibarra", "Jensen", "Kowalski", "Lambert", "Lindqvist", "Moreau",
    "Nakamura",
    "Novak", "Okafor", "Pereira", "Quinlan", "Ramsey", "Rossi", "Schneider", "Sullivan", "Takahashi",
    "Thornton",
    "Underwood", "Valdez", "Vasquez", "Whitaker", "Winslow", "Yamamoto", "Zeller", "Zimmerman", "Ostrowski",
    "Petrov",
)  # fmt: skip

CITIES = (
    "Amsterdam", "Athens", "Auckland", "Austin", "Bangkok", "Barcelona", "Bergen", "Bogota", "Boston",
    "Cairo",
    "Chicago", "Copenhagen", "Dublin", "Edinburgh", "Florence", "Geneva", "Hamburg", "Helsinki", "Istanbul",
    "Jakarta", "Kyoto", "Lagos", "Lima", "Lisbon", "Madrid", "Marseille", "Melbourne", "Montreal", "Munich",
    "Nairobi", "Oslo", "Porto", "Prague", "Quebec", "Reykjavik", "Santiago", "Seattle", "Seoul", "Tallinn",
    "Toronto", "Valencia", "Vienna", "Warsaw", "Zagreb", "Zurich",
)  # fmt: skip

COLORS = (
    "amber", "azure", "beige", "black", "bronze", "burgundy", "charcoal", "coral", "crimson", "cyan",
    "emerald", "gold", "indigo", "ivory", "lavender", "magenta", "maroon", "mustard", "navy", "olive",
    "orange", "peach", "purple", "scarlet", "silver", "teal", "turquoise", "white",
)  # fmt: skip

GENRES = (
    "adventure", "biography", "comedy", "documentary", "drama", "fantasy", "folk", "history", "horror",
    "jazz", "mystery", "opera", "poetry", "romance", "satire", "science fiction", "thriller", "western",
)  # fmt: skip

LANGUAGES = (
    "Arabic", "Czech", "Danish", "Dutch", "English", "Finnish", "French", "German", "Greek", "Hindi",
    "Italian", "Japanese", "Korean", "Norwegian", "Polish", "Portuguese", "Russian", "Spanish", "Swahili",
    "Swedish", "Turkish",
)  # fmt: skip

COMPANY_SUFFIXES = ("Labs", "Works", "Press", "Holdings", "Studios", "Systems", "Partners", "Foundry")
STREET_SUFFIXES = ("Street", "Avenue", "Road", "Lane", "Boulevard", "Way", "Court", "Drive")
MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip
